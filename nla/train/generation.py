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
    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int) -> list[Rollout]:
        ...

    def sync_weights(self) -> None:  # noqa: B027 - optional hook, a no-op when weights are shared
        """Called after every policy update; backends holding their own weights copy them here."""


class TransformersBackend(RolloutBackend):
    """``model.generate`` on the training model itself: weights are always current."""

    def __init__(self, verbalizer: Verbalizer):
        self.verbalizer = verbalizer

    @torch.no_grad()
    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int) -> list[Rollout]:
        settings.check()
        vb = self.verbalizer
        vectors = torch.as_tensor(vectors).float()
        check_vectors(vectors, vb.d_model)
        model = vb.model
        was_training = model.training
        model.eval()
        torch.manual_seed(seed)
        device = next(model.parameters()).device
        prompt = vb.prompt_ids()
        pad_id = vb.tokenizer.pad_token_id if vb.tokenizer.pad_token_id is not None else vb.end_ids[0]
        jobs = [i for i in range(len(vectors)) for _ in range(n)]
        rollouts: list[Rollout] = []
        try:
            with vb.injector() as injector:
                for start in range(0, len(jobs), settings.batch_size):
                    chunk = jobs[start : start + settings.batch_size]
                    # One prompt for every row (no tags in RL), so no padding is needed.
                    ids = torch.tensor([prompt] * len(chunk), device=device)
                    injector.set_vectors(vectors[chunk])
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        top_k=0,  # a model's default top_k=50 would sample from another distribution than we score
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


class VLLMBackend(RolloutBackend):
    """vLLM with prompt embeddings. Only ``replace`` injection: it lives in the embeddings.

    The engine starts from the warm-start AV weights (``base_dir``). With a LoRA policy each
    :meth:`sync_weights` saves the adapter and serves it under a new ``LoRARequest`` (public
    API); a fully fine-tuned policy's weights are pushed into the engine's model in place.
    """

    def __init__(self, verbalizer: Verbalizer, base_dir: str | Path, *, lora_rank: int | None = None,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto"):
        try:
            import vllm
        except ImportError:
            raise NLAError("--generation-backend vllm: vLLM is not installed (pip install vllm), "
                           "use --generation-backend transformers") from None
        if verbalizer.injection.mode != "replace":
            raise NLAError("--generation-backend vllm supports only 'replace' injection (the vector is "
                           "carried in the prompt embeddings); this bundle uses 'add'")
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

    def prompt_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` prompt embeddings with each vector injected by the AV's own hook."""
        vb = self.verbalizer
        emb = vb.model.get_input_embeddings()
        device = emb.weight.device
        ids = torch.tensor([vb.prompt_ids()] * len(vectors), device=device)
        with torch.no_grad(), vb.injector(vectors):
            # The hook sits on the embedding module's output, so calling the module injects.
            return emb(ids).detach().cpu()

    def generate(self, vectors: torch.Tensor, n: int, settings: SamplingSettings, seed: int) -> list[Rollout]:
        settings.check()
        vectors = torch.as_tensor(vectors).float()
        check_vectors(vectors, self.verbalizer.d_model)
        embeds = self.prompt_embeds(vectors)
        end_ids = list(self.verbalizer.end_ids)
        params = [
            self._vllm.SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p, top_k=-1,
                                      max_tokens=settings.max_new_tokens, stop_token_ids=end_ids, seed=seed + i)
            for i in range(len(vectors))
        ]
        outs = self.llm.generate([{"prompt_embeds": e} for e in embeds], params, lora_request=self._lora_request,
                                 use_tqdm=False)
        rollouts = []
        for i, out in enumerate(outs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                stop = getattr(comp, "stop_reason", None)
                # vLLM may leave a stop_token_ids hit out of token_ids; put the action back.
                if comp.finish_reason == "stop" and (not ids or ids[-1] not in end_ids):
                    ids.append(int(stop) if isinstance(stop, int) else end_ids[0])
                rollouts.append(make_rollout(self.verbalizer, i, ids))
        return rollouts

    def sync_weights(self) -> None:
        model = self.verbalizer.model
        self._version += 1
        if self.lora_rank:
            from vllm.lora.request import LoRARequest

            path = Path(self._adapter_dir.name) / f"v{self._version}"
            model.save_pretrained(str(path))
            self._lora_request = LoRARequest(f"nla-rl-{self._version}", self._version, str(path))
            return
        if self._version == 1:
            return  # the engine was started from these very weights
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights(weights=list(model.state_dict().items()))
        except AttributeError as exc:
            raise NLAError(f"vLLM {getattr(self._vllm, '__version__', '?')}: cannot push full-model weights into "
                           f"the engine ({exc}); train the AV with LoRA (--lora-r) to use vLLM") from None


def make_backend(name: str, verbalizer: Verbalizer, *, base_dir: str | Path | None = None,
                 lora_rank: int | None = None, gpu_memory_utilization: float = 0.3) -> RolloutBackend:
    if name == "transformers":
        return TransformersBackend(verbalizer)
    if name == "vllm":
        if base_dir is None:
            raise NLAError("the vLLM backend needs the warm-start AV weights saved as a model folder")
        return VLLMBackend(verbalizer, base_dir, lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization)
    raise NLAError(f"unknown generation backend {name!r} (use 'transformers' or 'vllm')")
