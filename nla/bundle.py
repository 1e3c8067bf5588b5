"""The NLA bundle (docs/design.md §7): AV + AR + sidecar, and the Python API around them.

```
RUN/
  nla_meta.yaml             kind: nla_bundle (see nla.parts.BundleMeta)
  mean_vector.safetensors   μ of the dataset the bundle was made from
  av/                       HF model dir or PEFT adapter dir
  ar/                       same, plus value_head.safetensors
```

Values disagree? explicit argument > bundle sidecar > dataset sidecar.

Every load ends in :meth:`NLA.from_parts`: a loader (our bundle's :func:`nla.parts.read_bundle`,
or a published layout's importer through :mod:`nla.interop.registry`) returns parts, and the
NLA builds itself from them. Importers never build an NLA themselves.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla import metrics
from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, write_yaml
from nla.models.injection import check_vectors, find_marker
from nla.models.prompts import (
    DEFAULT_AR_TEMPLATE,
    DEFAULT_AV_TEMPLATE,
    encode_rendered,
    render_chat,
    user_content,
)
from nla.models.reconstructor import Reconstructor, load_trunk
from nla.models.sharing import SharedParameter, share_frozen_base, unshare
from nla.models.verbalizer import InjectionSettings, Verbalization, Verbalizer
from nla.names import BUNDLE_KIND, MEAN_VECTOR_FILE, SINGLE_ROLE_KIND, VALUE_HEAD_FILE
from nla.parts import BundleMeta, NLAParts, apply_prompt_format, check_tokens, read_bundle

# Re-exported: the sidecar dataclass and the tokenizer checks live in nla.parts (below the
# importers) and are public here as before.
__all__ = ["NLA", "BundleMeta", "LoraSettings", "NLAParts", "RoundTrip", "SingleRoleNLA", "apply_prompt_format",
           "check_tokens", "load_vectors", "save_value_head", "swap_in"]


@dataclass
class LoraSettings:
    """PEFT LoRA settings shared by AV and AR."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            bias="none",
        )


@dataclass
class RoundTrip:
    explanations: list[str | None]
    raw: list[str]
    reconstructions: torch.Tensor
    per_vector: list[dict[str, float]]
    metrics: dict[str, float]


def load_vectors(path: str | Path) -> torch.Tensor:
    """Vectors from ``.safetensors`` (first tensor), ``.npy`` or ``.pt`` (``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise NLAError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if not tensors:
                raise NLAError(f"{path}: no tensors in file")
            value = tensors[sorted(tensors)[0]]
        elif suffix == ".npy":
            import numpy as np

            value = torch.from_numpy(np.load(path, allow_pickle=False).astype("float32"))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj[sorted(obj)[0]]
            if not isinstance(obj, torch.Tensor):
                raise NLAError(f"{path}: expected a tensor, found {type(obj).__name__}")
            value = obj
        else:
            raise NLAError(f"{path}: unsupported vector file (use .safetensors, .npy or .pt)")
    except NLAError:
        raise
    except Exception as exc:
        raise NLAError(f"{path}: cannot read vectors ({str(exc).splitlines()[0]})") from None
    value = value.float()
    return value.unsqueeze(0) if value.ndim == 1 else value


def save_value_head(head: torch.nn.Linear, ar_dir: Path) -> None:
    """The AR's head as ``ar/value_head.safetensors`` in fp32 (docs/design.md §5), bias when it has one."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().float().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().float().cpu().contiguous()
    save_file(tensors, str(ar_dir / VALUE_HEAD_FILE))


def swap_in(tmp: Path, root: Path) -> None:
    """Replace folder ``root`` by the finished ``tmp``: a kill leaves the old bundle or the new
    one (at worst beside ``root.old``), never a half-written folder."""
    old = root.with_name(root.name + ".old")
    if root.exists():
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
    tmp.rename(root)
    shutil.rmtree(old, ignore_errors=True)


class NLA:
    """A loaded NLA: ``verbalize``, ``reconstruct``, ``round_trip``, ``explain``."""

    def __init__(self, meta: BundleMeta, av_model: Any, reconstructor: Reconstructor, tokenizer: Any,
                 mean_vector: torch.Tensor | None = None):
        self.meta = meta
        self.av_model = av_model
        self.ar = reconstructor
        self.tokenizer = tokenizer
        self.mean_vector = mean_vector
        self.verbalizer = Verbalizer(
            av_model, tokenizer, meta.tokens, meta.prompt_templates["av"], meta.injection, meta.d_model
        )
        self._base: Any = None
        self._shared: list[SharedParameter] = []

    @property
    def device(self) -> torch.device:
        return next(self.av_model.parameters()).device

    # ---------------------------------------------------------------- construction
    @classmethod
    def initialize(
        cls,
        base_model: str | None = None,
        *,
        dataset: str | Path | None = None,
        layer: int | None = None,
        injection_mode: str = "replace",
        injection_scale: float | None = None,
        inject_layer: int = 1,
        inject_coef: float = 1.0,
        av_template: str = DEFAULT_AV_TEMPLATE,
        ar_template: str = DEFAULT_AR_TEMPLATE,
        lora: LoraSettings | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
    ) -> NLA:
        """An untrained bundle from a base model (+ dataset): what SFT starts from.

        With a dataset, its base model, layer and injection scale are used unless given here.
        """
        from nla.models.layers import default_layer, hidden_size, num_layers
        from nla.models.loading import canonical_spec, load_model, parse_dtype, resolve_model_path

        ds = None
        if dataset is not None:
            from nla.data.store import ActivationDataset

            ds = ActivationDataset.open(dataset)
            if base_model is None:
                base_model = ds.meta.base_model
            if layer is None:
                layer = ds.meta.layer_index
        spec = canonical_spec(base_model)
        av_model, tokenizer = load_model(spec, dtype=dtype, device=device)
        n_layers, d_model = num_layers(av_model.config), hidden_size(av_model.config)
        if layer is None:
            layer = default_layer(n_layers)
        if ds is not None:
            if ds.meta.layer_index != layer:
                raise NLAError(f"dataset {dataset} was extracted at layer {ds.meta.layer_index}, asked for layer {layer}")
            if ds.meta.d_model != d_model:
                raise NLAError(f"dataset {dataset} has d_model={ds.meta.d_model}, model {spec} has {d_model}")
        if injection_mode not in ("replace", "add"):
            raise NLAError(f"injection mode must be 'replace' or 'add', got {injection_mode!r}")
        if injection_mode == "add" and not 0 <= inject_layer < n_layers:
            raise NLAError(f"inject_layer {inject_layer} is out of range: the model has blocks 0..{n_layers - 1}")
        if injection_scale is not None and not (math.isfinite(injection_scale) and injection_scale > 0):
            raise NLAError(f"injection scale must be a positive number, got {injection_scale}")
        if injection_scale is None:
            injection_scale = (ds.meta.injection_scale if ds is not None else None) or float(d_model) ** 0.5

        def render(marker: str) -> str:
            return render_chat(tokenizer, user_content(av_template, marker))

        tokens = find_marker(render, lambda text: encode_rendered(tokenizer, text), tokenizer)
        trunk = load_trunk(resolve_model_path(spec), layer, parse_dtype(dtype)).to(av_model.device)
        ar = Reconstructor(trunk, tokenizer, ar_template).to(av_model.device)
        mean = ds.mean_vector() if ds is not None else None
        meta = BundleMeta(
            base_model=spec,
            layer_index=layer,
            d_model=d_model,
            n_layers=n_layers,
            injection=InjectionSettings(injection_mode, float(injection_scale), inject_layer, inject_coef),
            tokens=tokens,
            prompt_templates={"av": av_template, "ar": ar_template},
            mse_scale=float(d_model) ** 0.5,
            dataset=_dataset_stats(ds, mean) if ds is not None and mean is not None else {},
        )
        nla = cls(meta, av_model, ar, tokenizer, mean)
        if lora is not None:
            nla.add_lora(lora)
        return nla

    def add_lora(self, lora: LoraSettings) -> None:
        """Wrap AV and AR trunk in fresh LoRA adapters (the value head stays a full fp32 layer)."""
        from peft import get_peft_model

        self.av_model = get_peft_model(self.av_model, lora.peft_config())
        self.ar.trunk = get_peft_model(self.ar.trunk, lora.peft_config())
        self.verbalizer.model = self.av_model
        self.meta.av_format = self.meta.ar_format = "peft"
        self.share_frozen_base()

    def share_frozen_base(self) -> int:
        """Hold the base weights the AV and the AR trunk both freeze once; returns bytes saved.

        Done on load and by :meth:`add_lora`: a LoRA AR then costs only its adapter and value
        head beyond the AV (see :mod:`nla.models.sharing`). Outputs are bit-identical.
        """
        if not self._shared:
            self._shared = share_frozen_base(self.av_model, self.ar.trunk)
        shared = (getattr(s.owner, s.name) for s in self._shared)
        return sum(p.numel() * p.element_size() for p in shared)

    def unshare_frozen_base(self) -> None:
        """Give the AR trunk its own base weights again (before anything edits weights in place)."""
        unshare(self._shared)

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights, for inference only (`nla eval` does this).

        Unmerged LoRA costs two extra small matmuls per adapted layer per generated token,
        which on a CPU is a large share of the AV's generation time. The result is an
        ordinary full bundle (saving it writes full weights); greedy outputs can differ
        from the unmerged model's only by float rounding. The price: :meth:`base_states`
        can no longer disable the adapter and loads a second copy of the base model, which
        is why serving (which explains raw text) keeps the adapters unmerged.
        """
        from peft import PeftModel

        # Merging writes into the base weights, which the AR may be sharing with the AV.
        self.unshare_frozen_base()
        if isinstance(self.av_model, PeftModel):
            self.av_model = self.av_model.merge_and_unload()
            self.verbalizer.model = self.av_model
            self.meta.av_format = "full"
        if isinstance(self.ar.trunk, PeftModel):
            self.ar.trunk = self.ar.trunk.merge_and_unload()
            self.meta.ar_format = "full"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        is_trainable: bool = False,
    ) -> NLA:
        """Load a bundle folder (registry names and other layouts: see :mod:`nla.interop`)."""
        root = Path(path)
        meta_path = root / META_NAME
        if meta_path.exists() and read_yaml(meta_path).get("kind") == BUNDLE_KIND:
            return cls.from_parts(read_bundle(root, dtype=dtype, device=device, is_trainable=is_trainable))
        # A registry name, a hub repo or another published layout (paper, nanoNLA, PEFT pair,
        # universal): its loader in the table returns parts. The only import of nla.interop.
        from nla.interop.registry import load_parts, nla_parts

        _, parts = load_parts(str(path), dtype=dtype, device=device)
        return cls.from_parts(nla_parts(parts))

    @classmethod
    def from_parts(cls, parts: NLAParts) -> NLA:
        """The NLA from a loader's parts, after the sidecar is checked against them.

        Checked here, for every layout: the marker ids against the live tokenizer (§4), the
        sidecar's width against the AV's and AR's, the head's shape. A single-role half
        (``parts.role``) gives a :class:`SingleRoleNLA`.
        """
        from nla.models.layers import hidden_size

        meta, tokenizer = parts.meta, parts.tokenizer
        apply_prompt_format(tokenizer, meta)
        if parts.role == "av":
            check_tokens(tokenizer, meta.tokens, meta.prompt_templates["av"], parts.where, parts.field_names)
            parts.av_model.to(parts.device).eval()
            return SingleRoleNLA(meta, "av", tokenizer, av_model=parts.av_model)
        if parts.role == "ar":
            ar = _reconstructor(parts)
            ar.to(parts.device).eval()
            return SingleRoleNLA(meta, "ar", tokenizer, reconstructor=ar)
        if parts.av_model is None or parts.trunk is None or parts.head is None:
            raise NLAError(f"{parts.where}: an NLA needs an AV, an AR trunk and a value head")
        check_tokens(tokenizer, meta.tokens, meta.prompt_templates["av"], parts.where, parts.field_names)
        d_av, d_ar = hidden_size(parts.av_model.config), hidden_size(parts.trunk.config)
        if d_av != meta.d_model or d_ar != meta.d_model:
            raise NLAError(f"{parts.where}: field 'd_model' is {meta.d_model} but the AV has width {d_av} and the AR {d_ar}")
        if tuple(parts.head.weight.shape) != (meta.d_model, meta.d_model):
            raise NLAError(f"{parts.where}: value head has shape {list(parts.head.weight.shape)}, expected "
                           f"[{meta.d_model}, {meta.d_model}]")
        ar = _reconstructor(parts)
        av_model = parts.av_model
        if not getattr(av_model, "is_loaded_in_4bit", False):
            av_model.to(parts.device)
            ar.to(parts.device)
        else:
            # bitsandbytes placed the AV itself; the fp32 head follows it.
            ar.value_head.to(next(av_model.parameters()).device)
        if not parts.is_trainable:
            av_model.eval()
            ar.eval()
        nla = cls(meta, av_model, ar, tokenizer, parts.mean_vector)
        if parts.share_base:
            nla.share_frozen_base()
        return nla

    def save_pretrained(self, path: str | Path) -> None:
        """Write the bundle atomically enough: into ``path.tmp`` then swapped in place."""
        from safetensors.torch import save_file

        root = Path(path)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "av").mkdir(parents=True)
        (tmp / "ar").mkdir(parents=True)
        av = _unwrap(self.av_model)
        av.save_pretrained(tmp / "av")
        trunk = _unwrap(self.ar.trunk)
        trunk.save_pretrained(tmp / "ar")
        if self.meta.av_format == "full":
            self.tokenizer.save_pretrained(tmp / "av")
        save_value_head(self.ar.value_head, tmp / "ar")
        if self.mean_vector is not None:
            save_file({"mean": self.mean_vector.float().contiguous()}, str(tmp / MEAN_VECTOR_FILE))
        write_yaml(tmp / META_NAME, self.meta.to_dict())
        swap_in(tmp, root)

    # ---------------------------------------------------------------- API
    def verbalize(self, vectors: torch.Tensor, n: int = 1, **generate_kwargs: Any) -> list[list[Verbalization]]:
        return self.verbalizer.generate(torch.as_tensor(vectors), n=n, **generate_kwargs)

    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        return self.ar.reconstruct(list(texts), batch_size=batch_size)

    def round_trip(self, vectors: torch.Tensor, **generate_kwargs: Any) -> RoundTrip:
        vectors = torch.as_tensor(vectors).float()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        answers = [outs[0] for outs in self.verbalize(vectors, n=1, **generate_kwargs)]
        texts = [a.explanation if a.explanation is not None else a.raw for a in answers]
        recon = self.reconstruct(texts)
        mse = metrics.mse_nrm(recon, vectors)
        cos = metrics.cosine(recon, vectors)
        per = [{"mse_nrm": float(m), "cosine": float(c)} for m, c in zip(mse, cos)]
        summary: dict[str, float] = {"mse_nrm": float(mse.mean()), "cosine": float(cos.mean())}
        if self.mean_vector is not None:
            # B from the dataset when the bundle knows it: one vector has no spread to measure
            # B on, and a vector's FVE should not depend on which others came in the same call.
            b = self.baseline
            if b is None and len(vectors) > 1:
                b = float(metrics.baseline_variance(vectors, self.mean_vector))
            summary = metrics.summarize(recon, vectors, self.mean_vector, baseline=b)
            if b is not None:
                for row, value in zip(per, metrics.per_row_fve(recon, vectors, self.mean_vector, b)):
                    row["fve_nrm"] = float(value)
        return RoundTrip([a.explanation for a in answers], [a.raw for a in answers], recon, per, summary)

    def base_states(self, text: str | list[int]) -> tuple[list[int], torch.Tensor]:
        """Token ids of ``text`` (or the ids given) and the block-K state at every position
        (the dataset's vectors).

        Vectors must come from the *base* model: with LoRA that is the AV with its adapter
        disabled (no second copy); a fully fine-tuned AV is not the base, so the base is loaded
        once on first use.
        """
        from nla.models.forward import BlockOutput, block_states
        from nla.models.loading import load_model

        ids = list(text) if isinstance(text, list) else self.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise NLAError("text is empty")
        pad = self.tokenizer.pad_token_id or 0
        if hasattr(self.av_model, "disable_adapter"):
            with self.av_model.disable_adapter(), BlockOutput(self.av_model, self.meta.layer_index) as runner:
                return ids, block_states(runner, [ids], pad, self.device)[0]
        if self._base is None:
            if not self.meta.base_model:
                # An imported AV whose sidecar names no base: its own weights are fine-tuned,
                # so reading "base" activations from it would be silently wrong.
                raise NLAError("explain needs activations of the base model, but this NLA records none "
                               "(base_model is empty); import it again with --base-model MODEL")
            self._base, _ = load_model(self.meta.base_model, device=str(self.device))
        with BlockOutput(self._base, self.meta.layer_index) as runner:
            return ids, block_states(runner, [ids], pad, self.device)[0]

    def explain(self, text: str | list[dict[str, str]], positions: list[int] | None = None,
                **generate_kwargs: Any) -> list[dict[str, Any]]:
        """Verbalize the block-K state at chosen (default: all) token positions of ``text``.

        ``text`` may be a chat transcript, ``[{"role": ..., "content": ...}, ...]``: it is
        rendered with the model's chat template and each result also carries the token's
        ``role`` and ``part`` (``content`` or ``template``), see :mod:`nla.chat`.
        """
        transcript = None
        source: str | list[int]
        if isinstance(text, list):
            from nla.chat import render_transcript

            transcript = render_transcript(self.tokenizer, text)
            source = transcript.ids
        else:
            source = text
        ids, states = self.base_states(source)
        if positions is None:
            positions = list(range(len(ids)))
        for p in positions:
            if not -len(ids) <= p < len(ids):
                raise NLAError(f"position {p} is out of range: the text has {len(ids)} tokens")
        positions = [p % len(ids) for p in positions]
        vecs = states[positions]
        trip = self.round_trip(vecs, **generate_kwargs)
        return [
            {
                "position": p,
                "token": self.tokenizer.decode([ids[p]]),
                "context": self.tokenizer.decode(ids[: p + 1], skip_special_tokens=True),
                "explanation": trip.explanations[i],
                "raw": trip.raw[i],
                **trip.per_vector[i],
                **({"role": transcript.roles[p], "part": transcript.parts[p]} if transcript is not None else {}),
            }
            for i, p in enumerate(positions)
        ]

    def check_vectors(self, vectors: torch.Tensor) -> None:
        check_vectors(vectors, self.meta.d_model)

    @property
    def baseline(self) -> float | None:
        """B of docs/design.md §6 measured on the bundle's dataset (None when unknown)."""
        value = self.meta.dataset.get("baseline_b")
        return float(value) if isinstance(value, (int, float)) else None


class SingleRoleNLA(NLA):
    """An :class:`NLA` with one half: ``role`` is ``"av"`` (verbalize, explain) or ``"ar"`` (reconstruct).

    A publisher may release only one role (or a user may have only one of the two repos): the
    half that is there works exactly as in a pair; the other half's methods stop with one line
    saying which folder to add (``--ar DIR``). Saved, it is a half bundle (``kind:
    nla_single_role_bundle``: our sidecar plus ``role``, and only ``av/`` or ``ar/``), which
    :mod:`nla.interop.single` reads back.
    """

    def __init__(self, meta: BundleMeta, role: str, tokenizer: Any, av_model: Any = None,
                 reconstructor: Reconstructor | None = None):
        if role not in ("av", "ar") or (av_model is None) == (reconstructor is None):
            raise NLAError("a single-role NLA holds exactly one of an AV or an AR")
        self.meta = meta
        self.role = role
        self.tokenizer = tokenizer
        self.av_model = av_model
        self.ar = reconstructor  # type: ignore[assignment]
        self.mean_vector = None
        self._base = None
        self._shared = []
        self.verbalizer = (Verbalizer(av_model, tokenizer, meta.tokens, meta.prompt_templates["av"], meta.injection,
                                      meta.d_model) if av_model is not None else None)  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        module = self.av_model if self.av_model is not None else self.ar
        return next(module.parameters()).device

    def _missing(self, what: str) -> NLAError:
        other = "ar" if self.role == "av" else "av"
        source = (self.meta.extra.get("imported_from") or {}).get(self.role, "this folder")
        hint = f"--ar DIR (ar=...) with {source}" if other == "ar" else f"the AV folder as SOURCE and {source} as --ar"
        return NLAError(f"{what} needs the {other.upper()}, and this NLA is {self.role.upper()}-only; "
                        f"import the pair: {hint}")

    def share_frozen_base(self) -> int:
        return 0

    def verbalize(self, vectors: torch.Tensor, n: int = 1, **generate_kwargs: Any) -> list[list[Verbalization]]:
        if self.verbalizer is None:
            raise self._missing("verbalize")
        return super().verbalize(vectors, n=n, **generate_kwargs)

    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if self.ar is None:
            raise self._missing("reconstruct")
        return super().reconstruct(texts, batch_size=batch_size)

    def round_trip(self, vectors: torch.Tensor, **generate_kwargs: Any) -> Any:
        raise self._missing("round_trip")

    def explain(self, text: str | list[dict[str, str]], positions: list[int] | None = None,
                **generate_kwargs: Any) -> list[dict[str, Any]]:
        """AV-only: the explanations of the base model's block-K states (no reconstruction)."""
        if self.verbalizer is None:
            raise self._missing("explain")
        if not isinstance(text, str):
            raise NLAError("explain on a single-role NLA takes plain text, not a chat transcript")
        ids, states = self.base_states(text)
        positions = list(range(len(ids))) if positions is None else positions
        for p in positions:
            if not -len(ids) <= p < len(ids):
                raise NLAError(f"position {p} is out of range: the text has {len(ids)} tokens")
        positions = [p % len(ids) for p in positions]
        answers = [outs[0] for outs in self.verbalize(states[positions], n=1, **generate_kwargs)]
        return [{"position": p, "token": self.tokenizer.decode([ids[p]]),
                 "context": self.tokenizer.decode(ids[: p + 1], skip_special_tokens=True),
                 "explanation": a.explanation, "raw": a.raw} for p, a in zip(positions, answers)]

    def save_pretrained(self, path: str | Path) -> None:
        """A half bundle, written to ``path.tmp`` then swapped in (never half a folder)."""
        root = Path(path)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.av_model is not None:
            getattr(self.av_model, "module", self.av_model).save_pretrained(tmp / "av")
            self.tokenizer.save_pretrained(tmp / "av")
        else:
            assert self.ar is not None
            trunk: Any = self.ar.trunk
            trunk.save_pretrained(tmp / "ar")
            self.tokenizer.save_pretrained(tmp / "ar")
            save_value_head(self.ar.value_head, tmp / "ar")
        data = self.meta.to_dict()
        data.update(kind=SINGLE_ROLE_KIND, role=self.role)
        write_yaml(tmp / META_NAME, data)
        swap_in(tmp, root)


def _dataset_stats(ds: Any, mean: torch.Tensor) -> dict[str, Any]:
    """What the bundle keeps of its dataset: where it was, its size, norm and B (docs/design.md §6).

    B is measured on the eval split (the rows metrics are reported on), or on every row when
    a small dataset has no eval rows.
    """
    vecs = ds.vectors("eval")
    if len(vecs) < 2:
        vecs = ds.vectors()
    return {
        "path": str(ds.path.resolve()),
        "rows": ds.meta.rows,
        "norm_mean": ds.meta.norm_stats.get("mean"),
        "baseline_b": float(metrics.baseline_variance(vecs, mean)) if len(vecs) else None,
        "baseline_rows": len(vecs),
    }


def _reconstructor(parts: NLAParts) -> Reconstructor:
    """The AR from a trunk and its head, reading its input as the sidecar records."""
    ar = Reconstructor(parts.trunk, parts.tokenizer, parts.meta.prompt_templates["ar"])
    ar.add_special_tokens = bool(parts.meta.extra.get("ar_add_special_tokens", True))
    if parts.head is not None:
        ar.value_head = parts.head
    return ar


def _unwrap(model: Any) -> Any:
    """Strip DDP/accelerate wrappers (not PEFT: PEFT models save as adapters)."""
    return getattr(model, "module", model)
