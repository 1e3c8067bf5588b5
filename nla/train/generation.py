"""AV generation: one interface, two backends, for RL rollouts, `nla eval` and `nla serve`
(docs/design.md §8, §11; docs/scaling.md).

* :class:`TransformersBackend` (default): ``model.generate`` with the KV cache; the vector
  goes in through the verbalizer's injection hook, which acts on the prefill only.
* :class:`VLLMBackend` (``--generation-backend vllm``): vLLM with *prompt embeddings*: the
  AV's own embedding layer, with the same injection hook, turns the prompt into embeddings
  that already carry the vector, so vLLM needs no patch to inject anything.

Two calls, both group-major (the ``n`` answers of vector 0, then of vector 1, ...):

* :meth:`RolloutBackend.generate` (RL): :class:`Rollout` objects holding the sampled token ids
  *including* the end token when the answer ended: the end token is an action too, and
  dropping it from the log-probs would never teach the policy when to stop.
* :meth:`RolloutBackend.verbalize` (eval, serve): ``Verbalization`` lists, greedy or sampled,
  with the keyword arguments of ``Verbalizer.generate``; the transformers backend *is*
  ``Verbalizer.generate``, so eval and serve answer exactly as they did before the interface.
"""

from __future__ import annotations

import dataclasses
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.config_fields import BACKENDS  # the --generation-backend choices of train rl, eval, serve
from nla.errors import NLAError
from nla.models.injection import check_vectors
from nla.models.prompts import parse_explanation
from nla.models.verbalizer import Verbalization, Verbalizer


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64  # sequences per generate call (transformers backend)

    def check(self) -> None:
        if not self.temperature > 0:
            raise NLAError(f"temperature must be > 0 for RL sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise NLAError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise NLAError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """One sampled answer for vector ``vector_index``."""

    vector_index: int
    completion_ids: list[int]  # sampled ids, ending with the end token when ``finished``
    raw: str
    explanation: str | None
    finished: bool  # an end token came before max_new_tokens

    @property
    def invalid(self) -> bool:
        """Unparseable or cut off by max_new_tokens: scored with the invalid reward."""
        return self.explanation is None or not self.finished


def make_rollout(verbalizer: Verbalizer, index: int, sampled: list[int]) -> Rollout:
    end = set(verbalizer.end_ids)
    cut = next((k for k, t in enumerate(sampled) if t in end), None)
    kept = sampled if cut is None else sampled[: cut + 1]
    text_ids = kept if cut is None else kept[:-1]
    raw = verbalizer.tokenizer.decode(text_ids, skip_special_tokens=True)
    return Rollout(index, list(kept), raw, parse_explanation(raw), cut is not None)


class RolloutBackend(ABC):
    """Samples ``n`` answers per vector from the *current* policy."""

    @abstractmethod
    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int,
                 offset: int = 0) -> list[Rollout]:
        """``n`` answers per vector, group-major. ``offset``: the global index of ``vectors[0]``
        in the step's batch, so a rank generating its share samples what one process would."""
        ...

    @abstractmethod
    def verbalize(self, vectors: torch.Tensor, n: int = 1, *, max_new_tokens: int = 96, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
                  seed: int | None = None) -> list[list[Verbalization]]:
        """``n`` explanations per vector for eval and serve (greedy unless ``do_sample``), the
        arguments and the result of ``Verbalizer.generate``."""
        ...

    def sync_weights(self) -> None:  # noqa: B027 - optional hook, a no-op when weights are shared
        """Called after every policy update; backends holding their own weights copy them here."""


def row_key(seed: int, row: int) -> int:
    """The sampling stream of one answer: a function of (seed, global row) only."""
    return (seed * 1_000_003 + row * 7_919 + 17) % (2**63 - 1)


class RowSeededSampler:
    """Sampling as argmax of ``logits/T + Gumbel noise``, the noise seeded per (row, position).

    Exactly a draw from the (top-p filtered) softmax at temperature T, but each answer's draws
    depend only on its own key, never on which other rows share the batch: the same rollouts
    come out whatever ``--gen-batch-size``, and whatever the number of processes the batch is
    split over (docs/scaling.md). Installed as a transformers logits processor on a greedy
    ``generate``, so the KV cache and stopping are transformers' own.
    """

    def __init__(self, keys: list[int], prompt_len: int, temperature: float, top_p: float):
        self.keys = keys
        self.prompt_len = prompt_len
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pos = input_ids.shape[1] - self.prompt_len
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        noise = torch.empty_like(logits)
        for r, key in enumerate(self.keys):
            gen = torch.Generator(device=logits.device).manual_seed(row_key(key, pos))
            noise[r] = torch.rand(logits.shape[-1], generator=gen, device=logits.device)
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log((-torch.log(noise.clamp(min=tiny))).clamp(min=tiny))
        return logits + gumbel


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, -1)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # the mass before this token already suffices
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class TransformersBackend(RolloutBackend):
    """``model.generate`` on the training model itself: weights are always current."""

    def __init__(self, verbalizer: Verbalizer):
        self.verbalizer = verbalizer

    @torch.no_grad()
    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int,
                 offset: int = 0) -> list[Rollout]:
        from transformers import LogitsProcessor, LogitsProcessorList

        settings.check()
        vb = self.verbalizer
        vectors = torch.as_tensor(vectors).float()
        check_vectors(vectors, vb.d_model)
        model = vb.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompt = vb.prompt_ids()
        pad_id = vb.tokenizer.pad_token_id if vb.tokenizer.pad_token_id is not None else vb.end_ids[0]
        jobs = [i for i in range(len(vectors)) for _ in range(n)]
        rollouts: list[Rollout] = []

        class _Sampler(RowSeededSampler, LogitsProcessor):  # transformers checks the base class
            pass

        try:
            with vb.injector() as injector:
                for start in range(0, len(jobs), settings.batch_size):
                    chunk = jobs[start : start + settings.batch_size]
                    # One prompt for every row (no tags in RL), so no padding is needed.
                    ids = torch.tensor([prompt] * len(chunk), device=device)
                    injector.set_vectors(vectors[chunk])
                    keys = [row_key(seed, offset * n + start + r) for r in range(len(chunk))]
                    sampler = _Sampler(keys, len(prompt), settings.temperature, settings.top_p)
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        # Greedy over logits + Gumbel noise *is* sampling (RowSeededSampler); the
                        # model's own sampling defaults (top_k=50, its temperature) never apply.
                        do_sample=False,
                        logits_processor=LogitsProcessorList([sampler]),
                        max_new_tokens=settings.max_new_tokens,
                        eos_token_id=vb.end_ids,
                        pad_token_id=pad_id,
                        use_cache=True,
                    )
                    for r, i in enumerate(chunk):
                        rollouts.append(make_rollout(vb, i, out[r, len(prompt) :].tolist()))
        finally:
            model.train(was_training)
        return rollouts

    def verbalize(self, vectors: torch.Tensor, n: int = 1, *, max_new_tokens: int = 96, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
                  seed: int | None = None) -> list[list[Verbalization]]:
        # The very call eval and serve made before this interface: their answers are unchanged.
        return self.verbalizer.generate(torch.as_tensor(vectors), n=n, max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, temperature=temperature, top_p=top_p,
                                        batch_size=batch_size, seed=seed)


# ---------------------------------------------------------------- vLLM
# V1-engine prompt embeddings (vLLM PR #24278) first shipped in 0.11.0, the release that also
# removed the V0 engine; LLM.apply_model is the public way into the workers' model there.
MIN_VLLM = (0, 11, 0)
# vllm/sampling_params.py (SamplingParams._verify_args): temperature must lie in [0, 2].
VLLM_MAX_TEMPERATURE = 2.0
_NO_VLLM = "use --generation-backend transformers"


def check_vllm_version(version: str) -> None:
    """One-line error unless ``version`` is at least :data:`MIN_VLLM`."""
    import re

    nums = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    if len(nums) < 2:
        raise NLAError(f"--generation-backend vllm: cannot read the vLLM version {version!r}")
    have = tuple(nums + [0] * (3 - len(nums)))
    if have < MIN_VLLM:
        need = ".".join(map(str, MIN_VLLM))
        raise NLAError(f"--generation-backend vllm needs vLLM >= {need} (V1-engine prompt embeddings, "
                       f"LLM.apply_model); found {version}: pip install -U 'vllm>={need}'")


def cuda_visible() -> bool:
    """Whether a CUDA device is visible (vLLM's engine needs one); one name for tests to stand in for."""
    return torch.cuda.is_available()


def check_vllm_available() -> Any:
    """The ``vllm`` module, or a one-line error: not installed, too old, or no CUDA device.

    Called before any model is loaded or any output folder made, so ``--generation-backend
    vllm`` on a machine that cannot run it stops at once (vLLM's engine needs a CUDA GPU).
    """
    try:
        import vllm
    except ImportError:
        raise NLAError(f"--generation-backend vllm: vLLM is not installed (pip install "
                       f"'vllm>={'.'.join(map(str, MIN_VLLM))}'), {_NO_VLLM}") from None
    check_vllm_version(getattr(vllm, "__version__", "0"))
    if not cuda_visible():
        raise NLAError(f"--generation-backend vllm needs a CUDA GPU and none is visible here; {_NO_VLLM}")
    return vllm


def check_backend(name: str) -> None:
    """Refuse an unknown name, or vLLM where it cannot run, before any work starts."""
    if name not in BACKENDS:
        raise NLAError(f"unknown generation backend {name!r} (use 'transformers' or 'vllm')")
    if name == "vllm":
        check_vllm_available()


def build_prompt_embeds(verbalizer: Verbalizer, vectors: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]`` prompt embeddings with each vector injected by the AV's own hook.

    What vLLM receives as ``{"prompt_embeds": e}``: the embedding module's output with the
    injection hook applied, so the engine needs no patch and sees exactly what the transformers
    path's first layer sees. ``replace`` injection only: ``add`` acts on a later layer.
    """
    vb = verbalizer
    emb = vb.model.get_input_embeddings()
    ids = torch.tensor([vb.prompt_ids()] * len(vectors), device=emb.weight.device)
    with torch.no_grad(), vb.injector(vectors):
        # The hook sits on the embedding module's output, so calling the module injects.
        return emb(ids).detach().cpu()


def vllm_weight_items(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under Hugging Face checkpoint names, as ``load_weights`` expects.

    A PEFT model's names carry ``base_model.model.`` and ``.base_layer``; LoRA factors are left
    out (a LoRA policy reaches vLLM as an adapter, not as weights). vLLM's own loader then
    stacks q/k/v and gate/up itself, from these plain names.
    """
    lm = model.get_base_model() if _is_peft(model) else model
    out = []
    for name, tensor in lm.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out.append((name.replace(".base_layer", ""), tensor.detach()))
    return out


def _is_peft(model: Any) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def export_for_vllm(verbalizer: Verbalizer, folder: str | Path) -> int | None:
    """Write the model folder a vLLM engine starts from; the LoRA rank to serve, or None.

    A LoRA AV: its base weights (the adapter reaches vLLM as a ``LoRARequest``, saved by
    :meth:`VLLMBackend.sync_weights`); a full AV (eval merges LoRA first): its own weights.
    Hugging Face checkpoint names either way (:func:`vllm_weight_items`), and the tokenizer.
    """
    av = verbalizer.model
    model = av.get_base_model() if _is_peft(av) else av
    model.save_pretrained(str(folder), state_dict=dict(vllm_weight_items(av)))
    verbalizer.tokenizer.save_pretrained(str(folder))
    if not _is_peft(av):
        return None
    return max(int(c.r) for c in av.peft_config.values())


def _load_into_engine_model(weights: list[tuple[str, torch.Tensor]], model: Any) -> int:
    # Runs inside vLLM's worker (LLM.apply_model): the engine's model takes HF-named weights.
    model.load_weights(weights=weights)
    return len(weights)


def completion_ids(comp: Any, end_ids: list[int]) -> list[int]:
    """A ``CompletionOutput``'s sampled ids, ending with the end token when it stopped on one.

    A ``stop_token_ids`` hit may be left out of ``token_ids`` (special tokens are); it is put
    back, so a finished answer reads as finished and RL scores the end action.
    """
    ids = [int(t) for t in comp.token_ids]
    stop = getattr(comp, "stop_reason", None)
    if comp.finish_reason == "stop" and (not ids or ids[-1] not in end_ids):
        ids.append(int(stop) if isinstance(stop, int) else end_ids[0])
    return ids


def _completions(out: Any) -> list[Any]:
    # CompletionOutput.index is the sample's place among the request's n (vLLM fans a request
    # out into n child requests, vllm/v1/engine/parallel_sampling.py): keep that order.
    return sorted(out.outputs, key=lambda c: getattr(c, "index", 0))


def rollouts_from_vllm(verbalizer: Verbalizer, outputs: list[Any]) -> list[Rollout]:
    """vLLM ``RequestOutput`` objects (one per vector, ``n`` completions each) → group-major rollouts."""
    end_ids = list(verbalizer.end_ids)
    return [make_rollout(verbalizer, i, completion_ids(comp, end_ids))
            for i, out in enumerate(outputs) for comp in _completions(out)]


def verbalize_requests(embeds: torch.Tensor, n: int, *, max_new_tokens: int, do_sample: bool, temperature: float,
                       top_p: float, seed: int | None, stop_ids: list[int],
                       sampling_params: Any) -> tuple[list[dict[str, torch.Tensor]], list[Any]]:
    """The ``LLM.generate`` inputs for :meth:`VLLMBackend.verbalize`: one request per vector.

    Greedy is vLLM's ``temperature=0``, which allows only ``n=1`` (vllm/sampling_params.py,
    ``_verify_greedy_sampling``): greedy asks for one answer and :func:`verbalizations_from_vllm`
    repeats it, as greedy ``generate`` would have given ``n`` equal ones. Sampling is seeded per
    vector (``row_key``), and vLLM seeds the request's ``n`` children ``seed + index``, so a
    seeded call samples the same whatever else shares the batch. ``top_k=-1``: no top-k cut,
    as the transformers path. We always pass our own ``SamplingParams``, so the model folder's
    generation_config defaults (which vLLM applies only when none are given) never apply.
    """
    if do_sample and not 0 < temperature <= VLLM_MAX_TEMPERATURE:
        raise NLAError(f"vLLM samples at temperatures in (0, {VLLM_MAX_TEMPERATURE:g}], got {temperature}")
    prompts = [{"prompt_embeds": e} for e in embeds]
    params = []
    for i in range(len(prompts)):
        if do_sample:
            params.append(sampling_params(
                n=n, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens,
                stop_token_ids=list(stop_ids), seed=None if seed is None else row_key(seed, i) % 2**31))
        else:
            params.append(sampling_params(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                          stop_token_ids=list(stop_ids)))
    return prompts, params


def verbalizations_from_vllm(verbalizer: Verbalizer, outputs: list[Any], n: int) -> list[list[Verbalization]]:
    """``RequestOutput`` objects (one per vector) → ``n`` Verbalizations per vector, parsed by the
    verbalizer's own decoding (end token cut, explanation tags, truncation) as the transformers path."""
    end_ids = list(verbalizer.end_ids)
    result = []
    for out in outputs:
        answers = [verbalizer._decode(completion_ids(c, end_ids)) for c in _completions(out)]
        if len(answers) == 1 and n > 1:  # greedy: one answer stands for n equal ones
            answers = [dataclasses.replace(answers[0], token_ids=list(answers[0].token_ids)) for _ in range(n)]
        if len(answers) != n:
            raise NLAError(f"vLLM returned {len(answers)} answers for a vector, {n} were asked for")
        result.append(answers)
    return result


class VLLMBackend(RolloutBackend):
    """vLLM (>= 0.11, V1 engine) with prompt embeddings. Only ``replace`` injection.

    Public API only (vLLM's ``examples/offline_inference/prompt_embed_inference.py``,
    ``vllm/entrypoints/llm.py``): ``LLM(model, enable_prompt_embeds=True)``,
    ``generate([{"prompt_embeds": e}], ...)``; weight sync with a LoRA policy saves the adapter
    and serves it under a new ``LoRARequest``; a fully fine-tuned policy is pushed with
    ``LLM.apply_model(lambda m: m.load_weights(...))``. The engine runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the training GPU, so that push is an in-memory
    copy, not a serialisation of the model.
    """

    def __init__(self, verbalizer: Verbalizer, base_dir: str | Path, *, lora_rank: int | None = None,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto"):
        import os

        vllm = check_vllm_available()
        if verbalizer.injection.mode != "replace":
            raise NLAError("--generation-backend vllm supports only 'replace' injection (the vector is "
                           "carried in the prompt embeddings); this bundle uses 'add'")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.verbalizer = verbalizer
        self._vllm = vllm
        self.lora_rank = lora_rank
        self._version = 0
        self._adapter_dir = tempfile.TemporaryDirectory(prefix="nla-vllm-lora-")
        self._lora_request: Any = None
        self._owned: Any = None  # a temporary model folder this backend should outlive
        kwargs: dict[str, Any] = dict(model=str(base_dir), enable_prompt_embeds=True, dtype=dtype,
                                      gpu_memory_utilization=gpu_memory_utilization)
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max(8, int(lora_rank)))
        self.llm = vllm.LLM(**kwargs)
        self.sync_weights()

    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int,
                 offset: int = 0) -> list[Rollout]:
        settings.check()
        vectors = torch.as_tensor(vectors).float()
        check_vectors(vectors, self.verbalizer.d_model)
        embeds = build_prompt_embeds(self.verbalizer, vectors)
        params = [
            self._vllm.SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p, top_k=-1,
                                      max_tokens=settings.max_new_tokens,
                                      stop_token_ids=list(self.verbalizer.end_ids),
                                      seed=row_key(seed, offset + i) % 2**31)  # per request: split-invariant
            for i in range(len(vectors))
        ]
        outs = self.llm.generate([{"prompt_embeds": e} for e in embeds], params, lora_request=self._lora_request,
                                 use_tqdm=False)
        return rollouts_from_vllm(self.verbalizer, outs)

    def verbalize(self, vectors: torch.Tensor, n: int = 1, *, max_new_tokens: int = 96, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
                  seed: int | None = None) -> list[list[Verbalization]]:
        # batch_size is the transformers path's memory bound; vLLM schedules its own batches.
        vectors = torch.as_tensor(vectors).float()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        check_vectors(vectors, self.verbalizer.d_model)
        prompts, params = verbalize_requests(
            build_prompt_embeds(self.verbalizer, vectors), n, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=seed, stop_ids=list(self.verbalizer.end_ids),
            sampling_params=self._vllm.SamplingParams)
        outs = self.llm.generate(prompts, params, lora_request=self._lora_request, use_tqdm=False)
        return verbalizations_from_vllm(self.verbalizer, outs, n)

    def sync_weights(self) -> None:
        model = self.verbalizer.model
        self._version += 1
        if self.lora_rank:
            import shutil

            from vllm.lora.request import LoRARequest

            root = Path(self._adapter_dir.name)
            path = root / f"v{self._version}"
            model.save_pretrained(str(path))
            self._lora_request = LoRARequest(f"nla-rl-{self._version}", self._version, str(path))
            # vLLM has read an adapter by the time the next one is saved: keep disk use flat.
            shutil.rmtree(root / f"v{self._version - 2}", ignore_errors=True)
            return
        if self._version == 1:
            return  # the engine was started from these very weights
        from functools import partial

        self.llm.apply_model(partial(_load_into_engine_model, vllm_weight_items(model)))


def make_backend(name: str, verbalizer: Verbalizer, *, base_dir: str | Path | None = None,
                 lora_rank: int | None = None, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto") -> RolloutBackend:
    if name == "transformers":
        return TransformersBackend(verbalizer)
    if name == "vllm":
        if base_dir is None:
            raise NLAError("the vLLM backend needs the warm-start AV weights saved as a model folder")
        return VLLMBackend(verbalizer, base_dir, lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization,
                           dtype=dtype)
    raise NLAError(f"unknown generation backend {name!r} (use 'transformers' or 'vllm')")


def inference_backend(name: str, nla: Any, *, gpu_memory_utilization: float = 0.3) -> RolloutBackend:
    """The backend `nla eval` and `nla serve` generate with, for a loaded bundle.

    ``vllm``: the AV is written to a temporary model folder (:func:`export_for_vllm`, removed
    when the backend goes) and the engine runs in the AV's dtype, so the prompt embeddings the
    AV computes are in the engine's own dtype. 4-bit weights are refused: their saved form is
    bitsandbytes', not a checkpoint vLLM starts from.
    """
    check_backend(name)
    if name == "transformers":
        return TransformersBackend(nla.verbalizer)
    if getattr(nla.av_model, "is_loaded_in_4bit", False) or getattr(
            getattr(nla.av_model, "config", None), "quantization_config", None) is not None:
        raise NLAError("--generation-backend vllm does not take --load-in-4bit weights; drop one of the two")
    if nla.verbalizer.injection.mode != "replace":
        raise NLAError("--generation-backend vllm supports only 'replace' injection (the vector is "
                       "carried in the prompt embeddings); this bundle uses 'add'")
    folder = tempfile.TemporaryDirectory(prefix="nla-vllm-model-")
    lora = export_for_vllm(nla.verbalizer, folder.name)
    dtype = str(next(nla.av_model.parameters()).dtype).removeprefix("torch.")
    backend = VLLMBackend(nla.verbalizer, folder.name, lora_rank=lora, gpu_memory_utilization=gpu_memory_utilization,
                          dtype=dtype)
    backend._owned = folder
    return backend
