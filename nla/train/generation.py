"""Rollout generation for RL: one interface, two backends (docs/design.md §8, §11).

* :class:`TransformersBackend` (default): ``model.generate`` with the KV cache; the vector
  goes in through the verbalizer's injection hook, which acts on the prefill only.
* :class:`VLLMBackend` (``--generation-backend vllm``): vLLM with *prompt embeddings*: the
  AV's own embedding layer, with the same injection hook, turns the prompt into embeddings
  that already carry the vector, so vLLM needs no patch to inject anything.

Both return :class:`Rollout` objects group-major (the ``n`` samples of vector 0, then of
vector 1, ...), holding the sampled token ids *including* the end token when the answer ended:
the end token is an action too, and dropping it from the log-probs would never teach the
policy when to stop.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.models.injection import check_vectors
from nla.models.prompts import parse_explanation
from nla.models.verbalizer import Verbalizer


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


# ---------------------------------------------------------------- vLLM
# V1-engine prompt embeddings (vLLM PR #24278) first shipped in 0.11.0, the release that also
# removed the V0 engine; LLM.apply_model is the public way into the workers' model there.
MIN_VLLM = (0, 11, 0)


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
    lm = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    out = []
    for name, tensor in lm.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out.append((name.replace(".base_layer", ""), tensor.detach()))
    return out


def _load_into_engine_model(weights: list[tuple[str, torch.Tensor]], model: Any) -> int:
    # Runs inside vLLM's worker (LLM.apply_model): the engine's model takes HF-named weights.
    model.load_weights(weights=weights)
    return len(weights)


def rollouts_from_vllm(verbalizer: Verbalizer, outputs: list[Any]) -> list[Rollout]:
    """vLLM ``RequestOutput`` objects (one per vector, ``n`` completions each) → group-major rollouts."""
    end_ids = list(verbalizer.end_ids)
    rollouts = []
    for i, out in enumerate(outputs):
        for comp in out.outputs:
            ids = list(comp.token_ids)
            stop = getattr(comp, "stop_reason", None)
            # A stop_token_ids hit may be left out of token_ids; put the action back, it is scored.
            if comp.finish_reason == "stop" and (not ids or ids[-1] not in end_ids):
                ids.append(int(stop) if isinstance(stop, int) else end_ids[0])
            rollouts.append(make_rollout(verbalizer, i, ids))
    return rollouts


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

        try:
            import vllm
        except ImportError:
            raise NLAError("--generation-backend vllm: vLLM is not installed (pip install vllm), "
                           "use --generation-backend transformers") from None
        check_vllm_version(getattr(vllm, "__version__", "0"))
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
                 lora_rank: int | None = None, gpu_memory_utilization: float = 0.3) -> RolloutBackend:
    if name == "transformers":
        return TransformersBackend(verbalizer)
    if name == "vllm":
        if base_dir is None:
            raise NLAError("the vLLM backend needs the warm-start AV weights saved as a model folder")
        return VLLMBackend(verbalizer, base_dir, lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization)
    raise NLAError(f"unknown generation backend {name!r} (use 'transformers' or 'vllm')")
