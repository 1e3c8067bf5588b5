"""The NLA bundle (docs/design.md §7): AV + AR + sidecar, and the Python API around them.

```
RUN/
  nla_meta.yaml             kind: nla_bundle (see BundleMeta below)
  mean_vector.safetensors   μ of the dataset the bundle was made from
  av/                       HF model dir or PEFT adapter dir
  ar/                       same, plus value_head.safetensors
```

Values disagree? explicit argument > bundle sidecar > dataset sidecar.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla import metrics
from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, require, write_yaml
from nla.models.injection import MarkerTokens, check_vectors, find_marker
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
from nla.names import BUNDLE_KIND, BUNDLE_SCHEMA_VERSION, MEAN_VECTOR_FILE, VALUE_HEAD_FILE


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
class BundleMeta:
    base_model: str
    layer_index: int
    d_model: int
    n_layers: int
    injection: InjectionSettings
    tokens: MarkerTokens
    prompt_templates: dict[str, str]
    mse_scale: float
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    av_format: str = "full"
    ar_format: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from nla.names import VERSION as __version__

        return {
            "kind": BUNDLE_KIND,
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "base_model": self.base_model,
            "layer_index": self.layer_index,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "injection": self.injection.to_dict(),
            "tokens": self.tokens.to_dict(),
            "prompt_templates": dict(self.prompt_templates),
            "mse_scale": self.mse_scale,
            "dataset": self.dataset,
            "training": self.training,
            "av": {"format": self.av_format},
            "ar": {"format": self.ar_format},
            "extra": self.extra,
            "nla_version": __version__,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path) -> BundleMeta:
        kind = require(data, "kind", where, str)
        if kind != BUNDLE_KIND:
            raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {BUNDLE_KIND!r} (use `nla import` for other layouts)")
        version = require(data, "schema_version", where, int)
        if version != BUNDLE_SCHEMA_VERSION:
            raise NLAError(f"{where}: unknown schema_version {version} (this nla reads {BUNDLE_SCHEMA_VERSION})")
        inj = require(data, "injection", where, dict)
        mode = require(data, "injection.mode", where, str)
        if mode not in ("replace", "add"):
            raise NLAError(f"{where}: field 'injection.mode' has invalid value {mode!r}")
        tokens = MarkerTokens(
            require(data, "tokens.marker", where, str),
            require(data, "tokens.marker_id", where, int),
            require(data, "tokens.left_id", where, int),
            require(data, "tokens.right_id", where, int),
        )
        templates = require(data, "prompt_templates", where, dict)
        for key in ("av", "ar"):
            require(data, f"prompt_templates.{key}", where, str)
        return cls(
            base_model=require(data, "base_model", where, str),
            layer_index=require(data, "layer_index", where, int),
            d_model=require(data, "d_model", where, int),
            n_layers=require(data, "n_layers", where, int),
            injection=InjectionSettings(
                mode=mode,
                scale=float(require(data, "injection.scale", where, (int, float), positive=True)),
                layer=int(inj.get("layer", 1)),
                coef=float(inj.get("coef", 1.0)),
            ),
            tokens=tokens,
            prompt_templates={"av": templates["av"], "ar": templates["ar"]},
            mse_scale=float(data.get("mse_scale", require(data, "d_model", where, int) ** 0.5)),
            dataset=data.get("dataset") or {},
            training=data.get("training") or {},
            av_format=(data.get("av") or {}).get("format", "full"),
            ar_format=(data.get("ar") or {}).get("format", "full"),
            extra=data.get("extra") or {},
        )


@dataclass
class RoundTrip:
    explanations: list[str | None]
    raw: list[str]
    reconstructions: torch.Tensor
    per_vector: list[dict[str, float]]
    metrics: dict[str, float]


def check_tokens(tokenizer: Any, tokens: MarkerTokens, av_template: str, where: str) -> None:
    """The sidecar's marker ids must be what the live tokenizer produces (docs/design.md §4)."""
    ids = tokenizer.encode(tokens.marker, add_special_tokens=False)
    if list(ids) != [tokens.marker_id]:
        raise NLAError(f"{where}: field 'tokens.marker_id' is {tokens.marker_id} but the tokenizer encodes "
                       f"{tokens.marker!r} as {list(ids)}")
    prompt = encode_rendered(tokenizer, render_chat(tokenizer, user_content(av_template, tokens.marker)))
    hits = [i for i, t in enumerate(prompt) if t == tokens.marker_id]
    if len(hits) != 1:
        raise NLAError(f"{where}: the AV prompt holds the marker {len(hits)} times, expected once")
    p = hits[0]
    if prompt[p - 1] != tokens.left_id:
        raise NLAError(f"{where}: field 'tokens.left_id' is {tokens.left_id}, the live tokenizer gives {prompt[p - 1]}")
    if prompt[p + 1] != tokens.right_id:
        raise NLAError(f"{where}: field 'tokens.right_id' is {tokens.right_id}, the live tokenizer gives {prompt[p + 1]}")


def apply_prompt_format(tokenizer: Any, meta: BundleMeta) -> None:
    """An imported AV trained on a raw prompt (no chat turn) keeps its recorded template.

    ``extra.av_chat_template`` is a Jinja chat template written by the importer (e.g. BOS +
    the user text as is, docs/interop.md); the verbalizer renders prompts through it.
    """
    template = meta.extra.get("av_chat_template")
    if isinstance(template, str):
        tokenizer.chat_template = template


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
        from safetensors.torch import load_file

        from nla.models.loading import (
            load_model,
            load_tokenizer,
            parse_dtype,
            pick_device,
            resolve_model_path,
        )

        root = Path(path)
        meta_path = root / META_NAME
        if not meta_path.exists():
            from nla.interop import load_release

            return load_release(str(path), dtype=dtype, device=device)
        data = read_yaml(meta_path)
        if data.get("kind") != BUNDLE_KIND:
            # Another published layout (paper, nanoNLA, PEFT pair, universal): its importer.
            from nla.interop import load_release

            return load_release(str(path), dtype=dtype, device=device)
        meta = BundleMeta.from_dict(data, meta_path)
        dev = pick_device(device)
        torch_dtype = parse_dtype(dtype)
        tokenizer = load_tokenizer(meta.base_model) if meta.av_format == "peft" or not (root / "av" / "tokenizer_config.json").exists() \
            else load_tokenizer(str(root / "av"))
        apply_prompt_format(tokenizer, meta)
        check_tokens(tokenizer, meta.tokens, meta.prompt_templates["av"], str(meta_path))
        av_dir, ar_dir = root / "av", root / "ar"
        for sub in (av_dir, ar_dir):
            if not sub.is_dir():
                raise NLAError(f"{root}: missing folder {sub.name}/")
        if (av_dir / "adapter_config.json").exists():
            from peft import PeftModel

            base, _ = load_model(meta.base_model, dtype=torch_dtype, device=dev)
            av_model = PeftModel.from_pretrained(base, str(av_dir), is_trainable=is_trainable)
        else:
            av_model, _ = load_model(str(av_dir), dtype=torch_dtype, device=dev)
        if (ar_dir / "adapter_config.json").exists():
            from peft import PeftModel

            trunk = load_trunk(resolve_model_path(meta.base_model), meta.layer_index, torch_dtype)
            trunk = PeftModel.from_pretrained(trunk, str(ar_dir), is_trainable=is_trainable)
        else:
            trunk = load_trunk(str(ar_dir), None, torch_dtype)
        ar = Reconstructor(trunk, tokenizer, meta.prompt_templates["ar"])
        ar.add_special_tokens = bool(meta.extra.get("ar_add_special_tokens", True))
        head_file = ar_dir / VALUE_HEAD_FILE
        if not head_file.exists():
            raise NLAError(f"{ar_dir}: missing {VALUE_HEAD_FILE}")
        # Re-applied after any adapter load: PEFT knows nothing of the value head.
        head = load_file(str(head_file))
        if "weight" not in head or tuple(head["weight"].shape) != (meta.d_model, meta.d_model):
            raise NLAError(f"{head_file}: expected a 'weight' of shape [{meta.d_model}, {meta.d_model}]")
        ar.value_head.weight.data.copy_(head["weight"].float())
        if "bias" in head:
            # Imported heads may carry a bias (published `linear_head.pt` layouts).
            ar.value_head.bias = torch.nn.Parameter(head["bias"].float().clone())
        ar.to(dev)
        av_model.to(dev)
        if not is_trainable:
            av_model.eval()
            ar.eval()
        mean = load_file(str(root / MEAN_VECTOR_FILE))["mean"].float() if (root / MEAN_VECTOR_FILE).exists() else None
        nla = cls(meta, av_model, ar, tokenizer, mean)
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


def _unwrap(model: Any) -> Any:
    """Strip DDP/accelerate wrappers (not PEFT: PEFT models save as adapters)."""
    return getattr(model, "module", model)
