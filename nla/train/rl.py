"""Joint RL of the verbalizer against the reconstructor: GRPO (docs/design.md §8).

One step, for a batch of ``B`` activations from the ``rl`` split:

1. **generate** — the AV samples ``G`` answers per vector (:mod:`nla.train.generation`);
2. **reward** — the *current* AR reconstructs every answer; the reward callables score them
   (:mod:`nla.train.rewards`), unparseable or truncated answers get −2; advantages are the
   rewards normalised within each group of ``G``;
3. **update** — policy-gradient loss on the sampled tokens, their log-probs recomputed by a
   forward pass with the vector injected, plus a k3 KL penalty to the frozen warm-start AV;
   with ``updates_per_batch > 1`` the ratio to the rollout-time policy is PPO-clipped;
4. **AR** — the AR takes ``ar_steps`` MSE steps on the fresh explanations, so the next batch
   is scored by an AR that has seen what the AV now writes (never a stale reward).

The reference policy. With LoRA (default) the warm-start AV is merged into the base weights
(if it was itself an adapter) and a fresh RL adapter goes on top: the reference is then the
very same weights with the adapter disabled, no second copy held. With full fine-tuning
(``--lora-r 0``) the reference is a frozen copy. The bundle written stores the AV merged
(``av.format: full``), the AR as it was (adapter or full) with its value head.

Resume: the reference is rebuilt from the warm-start bundle, the policy from the checkpoint
(the RL adapter or the full AV weights), the AR from the checkpoint bundle, both optimizers and
the RNG from the trainer state; data order and sampling seeds are functions of the step, so a
resumed run continues the same curve.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nla import metrics
from nla.config import BUNDLE_ENTRIES, claim_output, config_to_dict, opt, save_config, validate
from nla.config_fields import (
    AnswerFields,
    BackendFields,
    LoggingFields,
    LoRAFields,
    RuntimeFields,
    SamplingFields,
    override,
)
from nla.errors import NLAError
from nla.models.injection import Injector
from nla.models.loading import check_4bit_available, load_in_4bit
from nla.names import write_json_atomic
from nla.train import loop
from nla.train.generation import (
    Rollout,
    RolloutBackend,
    SamplingSettings,
    check_backend,
    make_backend,
    vllm_weight_items,
)
from nla.train.rewards import (
    RewardFn,
    group_advantages,
    length_penalty,
    resolve_reward,
    score_rollouts,
)

PHASE = "rl"
SUMMARY_FILE = "rl_summary.json"
# What an RL run writes into --out (--force removes exactly these) and the settings a resume may change.
RL_OWNED = (*BUNDLE_ENTRIES, "train_config.yaml", loop.METRICS_FILE, loop.PLOT_FILE, loop.CHECKPOINTS, SUMMARY_FILE,
            "tensorboard")
RL_RESUME_FREE = frozenset({"resume", "force", "progress", "device", "save_every", "keep_checkpoints",
                            "tensorboard", "wandb", "wandb_project"})


@dataclass
class RLConfig(SamplingFields, BackendFields, LoRAFields, RuntimeFields, LoggingFields):
    """Settings of ``nla train rl`` (each docstring-like help is the ``--help`` line)."""

    nla: str = opt("", help="warm-start bundle (e.g. the output of `nla train sft`)", required=True)
    data: str = opt("", help="activation dataset; RL samples its 'rl' split, evaluates on 'eval'", required=True)
    out: str = opt("", help="run directory: final bundle, metrics.jsonl, curves.png, checkpoints/", required=True)
    steps: int = opt(100, help="optimizer steps (one batch of activations each)")
    batch_size: int = opt(8, help="activation vectors per step")
    group_size: int = opt(4, help="G: explanations sampled per vector (advantages are normalised within it; a "
                                  "group of 1 has no baseline)", ge=2)
    # The group's field with RL's own help: here the cap also decides the reward.
    max_new_tokens: int = override(AnswerFields, "max_new_tokens", 64,
                                   help="answer length limit; an answer cut off here gets the invalid reward")
    gen_batch_size: int = opt(64, help="sequences per generate call (transformers backend)")
    lr: float = opt(1e-5, help="AV learning rate")
    warmup_steps: int = opt(0, help="AV linear warm-up steps before cosine decay")
    kl_coef: float = opt(0.01, help="weight of the k3 KL penalty to the frozen warm-start AV")
    updates_per_batch: int = opt(1, help="policy optimizer steps per batch; >1 turns on PPO clipping")
    clip_eps: float = opt(0.2, help="PPO clip range of the probability ratio (used when updates_per_batch > 1)")
    update_batch_size: int = opt(16, help="sequences per forward pass in the policy update (memory bound)")
    normalize_std: bool = opt(True, help="divide group-centred rewards by the group's std (GRPO); off: Dr. GRPO")
    max_grad_norm: float = opt(1.0, help="gradient clipping norm (AV and AR)")
    # opt() turns a list default into a default_factory field, so no instance shares it.
    reward: list[str] = opt(["neg_mse"], help="reward(s): neg_mse, neg_log_mse, contrastive or module:function")
    reward_weights: list[float] = opt([], help="one weight per reward (default: all 1)")
    length_penalty: float = opt(0.0, help="reward −this per answer token (0: off)")
    invalid_reward: float | None = opt(-2.0, help="reward of an unparseable or truncated answer (YAML null: no floor)")
    # 0 is allowed here (full fine-tuning), unlike the shared LoRA rank.
    lora_r: int = opt(16, help="rank of the RL adapter on the AV (0: full fine-tuning with a frozen reference copy)",
                      ge=0)
    train_ar: bool = opt(True, help="keep training the AR on the fresh explanations")
    ar_lr: float = opt(1e-4, help="AR learning rate")
    ar_steps: int = opt(1, help="AR optimizer steps per batch")
    ar_batch_size: int = opt(32, help="explanations per AR step")
    collapse_threshold: float = opt(0.5, help="mode-collapse alarm when the distinct-explanation rate drops below this")
    eval_rows: int = opt(64, help="eval-split vectors for the round-trip fve_nrm before/after RL (0: skip)")
    eval_split: str = opt("eval", help="split of that before/after figure (never `rl`, the training split)")
    save_every: int = opt(50, help="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(2, help="checkpoints kept")
    resume: bool = opt(False, help="continue from the last checkpoint in --out (the settings must match the run's)")
    force: bool = opt(False, help="start over in an --out that holds a run (or other files): replaces only RL's own files")
    load_in_4bit: bool = opt(False, help="QLoRA: load the AV and AR base weights in 4-bit NF4 (CUDA + bitsandbytes; LoRA only)")


# ---------------------------------------------------------------- data order
def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of step ``step``: epochs are seeded permutations laid end to end (resume-safe)."""
    if n_rows == 0:
        raise NLAError("the dataset has no 'rl' rows (re-extract with an rl share in `nla extract --split`, "
                       "e.g. av_sft=0.4,ar_sft=0.3,rl=0.2,eval=0.1)")
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[offset : offset + batch_size - len(out)].tolist()
        out.extend(take)
        pos += len(take)
    return out


# ---------------------------------------------------------------- policy setup
def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def prepare_policy(nla: Any, cfg: RLConfig) -> Any:
    """Turn the warm-start AV into the RL policy; returns the frozen reference (None: adapter-off)."""
    # The policy's base weights change below (merge, or full fine-tuning): the AR must stop
    # sharing them first.
    nla.unshare_frozen_base()
    av = nla.av_model
    if _is_peft(av):
        # The warm-start adapter becomes part of the weights, so "adapter disabled" below means
        # exactly the warm-start AV, not the untrained base model.
        av = av.merge_and_unload()
    ref = None
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        # The adapter's random init from --seed: a run (and every rank of one) starts the same.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            av = get_peft_model(av, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules="all-linear", bias="none"))
    else:
        ref = copy.deepcopy(av).eval().requires_grad_(False)
        av.requires_grad_(True)
    av.train()
    nla.av_model = av
    nla.verbalizer.model = av
    return ref


class MergedSaver:
    """Saves the bundle with the AV merged (format ``full``): what loads with ``from_pretrained``."""

    def __init__(self, nla: Any):
        self.nla = nla

    def save_pretrained(self, path: str | Path) -> None:
        nla = self.nla
        av, fmt = nla.av_model, nla.meta.av_format
        merged = copy.deepcopy(av).merge_and_unload() if _is_peft(av) else av
        nla.av_model, nla.meta.av_format = merged, "full"
        try:
            nla.save_pretrained(path)
        finally:
            nla.av_model, nla.meta.av_format = av, fmt


# ---------------------------------------------------------------- log-probs and loss
# Logits of one chunk of answer positions (fp32 elements, 64 MB): bounds what the log-prob pass
# holds at once however large the vocabulary, batch or answer length.
LOGPROB_CHUNK_ELEMENTS = 1 << 24


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if _is_peft(model) else model


def supports_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can project only the last positions onto the vocabulary."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(_causal_lm(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _head_parts(model: Any) -> tuple[Any, Any, float | None] | None:
    """``(decoder, lm_head, softcap)`` when the model splits that way, else None."""
    lm = _causal_lm(model)
    get_dec, get_head = getattr(lm, "get_decoder", None), getattr(lm, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    try:
        decoder, head = get_dec(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is lm:
        return None
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    return decoder, head, float(cap) if cap else None


def _head_logits(head: Any, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if softcap:  # gemma 2/3's final soft-cap, as their forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _head_split_verified(model: Any, parts: tuple[Any, Any, float | None], ids: torch.Tensor,
                         attn: torch.Tensor) -> bool:
    """Decoder → head reproduces the model's own logits (checked once per model, on one row).

    A model whose forward does more after the head (a logit scale, a custom soft-cap) fails
    this and is scored from its own logits instead: exactness is verified, never assumed.
    """
    lm = _causal_lm(model)
    cached = getattr(lm, "_nla_head_split_ok", None)
    if cached is not None:
        return bool(cached)
    decoder, head, cap = parts
    n = int(attn[0].sum())
    with torch.no_grad():
        want = model(input_ids=ids[:1, :n], attention_mask=attn[:1, :n], use_cache=False).logits[0, -1].float()
        hidden = decoder(input_ids=ids[:1, :n], attention_mask=attn[:1, :n], use_cache=False).last_hidden_state
        got = _head_logits(head, hidden[0, -1:], cap)[0].float()
    ok = bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max().clamp(min=1.0))))
    lm._nla_head_split_ok = ok  # an nn.Module takes plain attributes; the verdict holds for its lifetime
    return ok


def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    # log p(target) = logit[target]/T − logsumexp(logits/T), in fp32.
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, -1)


def _chunk_logprobs(head: Any, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    return _picked_logprobs(_head_logits(head, hidden, softcap), targets, temperature)


def head_chunked_logprobs(head: Any, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor,
                          temperature: float, chunk_elements: int = LOGPROB_CHUNK_ELEMENTS) -> torch.Tensor:
    """``[N, L]`` log-probs of ``targets`` from the last hidden states ``[N, L, d]``.

    The vocabulary projection and the fp32 log-softmax run a chunk of positions at a time; with
    autograd each chunk is recomputed in the backward pass (activation checkpointing), so only
    the hidden states stay alive: no ``[N, L, vocab]`` tensor exists at any time, in any dtype.
    """
    from torch.utils.checkpoint import checkpoint

    n, width = targets.shape
    vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    step = max(1, chunk_elements // max(n * vocab, 1))
    parts = []
    for s in range(0, width, step):
        h, tgt = hidden[:, s : s + step], targets[:, s : s + step]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            parts.append(checkpoint(_chunk_logprobs, head, softcap, h, tgt, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, softcap, h, tgt, temperature))
    return torch.cat(parts, 1)


def completion_logprobs(model: Any, injector: Injector, prompt: list[int], completions: list[list[int]],
                        vectors: torch.Tensor, temperature: float, pad_id: int,
                        chunk_elements: int = LOGPROB_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N, L], mask [N, L])`` of the sampled tokens, vector injected at the marker.

    Scored at the sampling temperature: the ratio and KL must compare the distribution the
    tokens were actually drawn from. Memory (docs/scaling.md): the decoder runs once, then only
    the answer positions go through the vocabulary projection, in checkpointed chunks
    (:func:`head_chunked_logprobs`). A model that does not split into decoder and head (or whose
    split does not reproduce its logits) is scored from ``model(..., logits_to_keep=L+1)``:
    answer positions only, still never the prompt's.
    """
    device = next(model.parameters()).device
    width = max(len(c) for c in completions)
    p = len(prompt)
    ids = torch.full((len(completions), p + width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, comp in enumerate(completions):
        ids[r, :p] = torch.tensor(prompt)
        ids[r, p : p + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[r, : p + len(comp)] = 1
    ids, attn = ids.to(device), attn.to(device)
    targets = ids[:, p : p + width]
    mask = attn[:, p : p + width].float()
    parts = _head_parts(model)
    # Position t predicts token t+1: the answer's tokens are predicted from p-1 .. p+L-2.
    injector.set_vectors(vectors[:1])  # the one-row check below (cached after the first call)
    if parts is not None and _head_split_verified(model, parts, ids, attn):
        decoder, head, cap = parts
        injector.set_vectors(vectors)
        hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        return head_chunked_logprobs(head, cap, hidden[:, p - 1 : p - 1 + width], targets, temperature,
                                     chunk_elements), mask
    injector.set_vectors(vectors)
    if supports_logits_to_keep(model):
        # Right padding: the answer positions are the last L+1 less the very last one.
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=width + 1).logits[:, :-1]
    else:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, p - 1 : p - 1 + width]
    return _picked_logprobs(logits, targets, temperature), mask


def naive_completion_logprobs(model: Any, injector: Injector, prompt: list[int], completions: list[list[int]],
                              vectors: torch.Tensor, temperature: float, pad_id: int) -> torch.Tensor:
    """The textbook computation: every position, fp32 log-softmax over the whole vocabulary.

    What RL did before; kept as the reference :func:`completion_logprobs` is tested and
    benchmarked against (benchmarks/rl_memory.py).
    """
    device = next(model.parameters()).device
    width = max(len(c) for c in completions)
    p = len(prompt)
    ids = torch.full((len(completions), p + width), pad_id, dtype=torch.long)
    for r, comp in enumerate(completions):
        ids[r, :p] = torch.tensor(prompt)
        ids[r, p : p + len(comp)] = torch.tensor(comp, dtype=torch.long)
    attn = (torch.arange(p + width)[None] < torch.tensor([[p + len(c)] for c in completions])).long()
    injector.set_vectors(vectors)
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits.float()
    logp_all = torch.log_softmax(logits / temperature, -1)
    return logp_all[:, p - 1 : p - 1 + width].gather(-1, ids[:, p : p + width].to(device).unsqueeze(-1)).squeeze(-1)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                    clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence loss ``[N]`` (token mean) and per-sequence KL ``[N]``.

    ``ratio = exp(logp − old_logp)``; with ``old_logp = logp.detach()`` (one update per batch)
    it is 1 and the gradient is plain REINFORCE with group baselines. k3 KL:
    ``exp(ref − logp) − (ref − logp) − 1`` ≥ 0, unbiased, low variance (Schulman).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if ref_logp is not None:
        delta = (ref_logp - logp).clamp(-20, 20)  # exp of a wild delta would overflow to inf
        kl = torch.exp(delta) - delta - 1
    else:
        kl = torch.zeros_like(logp)
    per_token = pg + kl_coef * kl
    n_tok = mask.sum(-1).clamp(min=1)
    return (per_token * mask).sum(-1) / n_tok, (kl * mask).sum(-1) / n_tok


# ---------------------------------------------------------------- trainer
def distinct_rate(texts: list[str]) -> float:
    return len(set(texts)) / max(len(texts), 1)


class RLTrainer:
    def __init__(self, cfg: RLConfig, *, rewards: list[tuple[RewardFn, float]] | None = None):
        from nla.bundle import NLA
        from nla.data.store import SPLITS, ActivationDataset

        self.cfg = cfg
        validate(cfg, "train rl")  # the Python API gets the checks of flags and YAML (required, ranges)
        if cfg.eval_split not in SPLITS or cfg.eval_split == "rl":
            raise NLAError(f"--eval-split {cfg.eval_split!r}: choose a held-out split other than 'rl' "
                           f"({', '.join(s for s in SPLITS if s != 'rl')})")
        if cfg.load_in_4bit:
            if cfg.lora_r <= 0:
                raise NLAError("--load-in-4bit trains LoRA adapters on frozen 4-bit weights; --lora-r 0 (full "
                               "fine-tuning) cannot update them: pass --lora-r N")
            check_4bit_available(cfg.device)  # before the run directory is claimed
        loop.check_logging_backends(cfg.tensorboard, cfg.wandb)
        check_backend(cfg.generation_backend)  # vLLM missing, too old or no GPU: before --out is claimed
        # Under `accelerate launch`: this rank's place and device (docs/scaling.md).
        self.dist = loop.Distributed(cfg.device)
        if self.dist.world > 1 and cfg.generation_backend != "transformers":
            raise NLAError("--generation-backend vllm runs in one process; under accelerate launch use "
                           "--generation-backend transformers (each rank generates its share)")
        self.out = Path(cfg.out)
        # The shared output guard (nla.config.claim_output), before anything is loaded or written;
        # on the main process only, its refusal raised on every rank.
        def claim() -> None:
            claim_output(self.out, command="train rl", force=cfg.force, resume=cfg.resume, owned=RL_OWNED,
                         config_file="train_config.yaml", settings=config_to_dict(cfg), free=RL_RESUME_FREE)

        self.dist.on_main(claim)
        self.rewards = rewards if rewards is not None else self._rewards_from_config()
        self.ds = ActivationDataset.open(cfg.data)
        with load_in_4bit(cfg.load_in_4bit, cfg.device):
            self.nla = NLA.from_pretrained(cfg.nla, device=self.dist.device, dtype=cfg.dtype, is_trainable=True)
        meta = self.nla.meta
        if self.ds.meta.d_model != meta.d_model:
            raise NLAError(f"dataset {cfg.data} has d_model={self.ds.meta.d_model}, bundle {cfg.nla} has {meta.d_model}")
        if self.ds.meta.layer_index not in (-1, meta.layer_index):
            raise NLAError(f"dataset {cfg.data} is layer {self.ds.meta.layer_index}, bundle {cfg.nla} layer {meta.layer_index}")
        self.vectors = self.ds.vectors("rl")
        if len(self.vectors) == 0:
            raise NLAError(f"{cfg.data}: no rows in the 'rl' split")
        self.eval_vectors = self.ds.vectors(cfg.eval_split)[: cfg.eval_rows] if cfg.eval_rows else torch.zeros(0)
        self.mean = self.ds.mean_vector()
        self.ref = prepare_policy(self.nla, cfg)
        self.device = self.nla.device
        if self.ref is not None:
            self.ref.to(self.device)
        self.policy_params = [p for p in self.nla.av_model.parameters() if p.requires_grad]
        self.ar_params = [p for p in self.nla.ar.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.policy_params, lr=cfg.lr, weight_decay=0.0)
        self.sched = loop.cosine_with_warmup(self.opt, cfg.warmup_steps, cfg.steps)
        self.ar_opt = torch.optim.AdamW(self.ar_params, lr=cfg.ar_lr, weight_decay=0.0) if cfg.train_ar else None
        # A fresh RL adapter is random per process: every rank starts from rank 0's.
        self.dist.broadcast_params(self.policy_params + self.ar_params)
        self.sampling = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.gen_batch_size)
        self.backend = self._backend()
        self.state = loop.TrainerState(phase=PHASE, total_steps=cfg.steps)

    def _rewards_from_config(self) -> list[tuple[RewardFn, float]]:
        cfg = self.cfg
        fns = [resolve_reward(r) for r in cfg.reward]
        weights = list(cfg.reward_weights) or [1.0] * len(fns)
        if len(weights) != len(fns):
            raise NLAError(f"--reward-weights has {len(weights)} values for {len(fns)} rewards")
        pairs = list(zip(fns, weights))
        if cfg.length_penalty:
            pairs.append((length_penalty(cfg.length_penalty), 1.0))
        return pairs

    def _backend(self) -> RolloutBackend:
        cfg = self.cfg
        base_dir = None
        if cfg.generation_backend == "vllm":
            # vLLM serves the warm-start weights; the policy reaches it as an adapter or a weight push.
            base_dir = self.out / "vllm_base"
            av = self.nla.av_model
            with av.disable_adapter() if _is_peft(av) else nullcontext():
                model = av.get_base_model() if _is_peft(av) else av
                # The same checkpoint names the later weight pushes use (generation.vllm_weight_items).
                model.save_pretrained(base_dir, state_dict=dict(vllm_weight_items(av)))
            self.nla.tokenizer.save_pretrained(base_dir)
        return make_backend(cfg.generation_backend, self.nla.verbalizer, base_dir=base_dir,
                            lora_rank=cfg.lora_r or None, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)

    # ------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.ar_opt is not None:
            extra["ar_optimizer"] = self.ar_opt.state_dict()
        av = self.nla.av_model
        if _is_peft(av):
            from peft import get_peft_model_state_dict

            extra["rl_adapter"] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(av).items()}
        return extra

    def save(self) -> Path | None:
        """One checkpoint, written by the main process (every rank holds the same weights)."""
        path = None
        if self.dist.main:
            path = loop.save_checkpoint(self.out, MergedSaver(self.nla), self.state, self.opt, self.sched,
                                        keep=self.cfg.keep_checkpoints, extra=self._extra_state())
        self.dist.barrier()  # no rank runs ahead of a checkpoint a resume may need
        return path

    def try_resume(self) -> bool:
        from nla.bundle import NLA

        ckpt = loop.latest_checkpoint(self.out, PHASE)
        if ckpt is None:
            return False
        with load_in_4bit(self.cfg.load_in_4bit, self.cfg.device):
            saved = NLA.from_pretrained(ckpt, device=self.dist.device, dtype=self.cfg.dtype, is_trainable=True)
        extra = loop.checkpoint_extra(ckpt)
        # AR: the checkpoint's, copied into the live modules so the optimizer keeps its params.
        self.nla.ar.load_state_dict(saved.ar.state_dict())
        av = self.nla.av_model
        if _is_peft(av):
            from peft import set_peft_model_state_dict

            if "rl_adapter" not in extra:
                raise NLAError(f"{ckpt}: checkpoint has no RL adapter (was it made with --lora-r 0?)")
            set_peft_model_state_dict(av, extra["rl_adapter"])
        else:
            av.load_state_dict(saved.av_model.state_dict())
        del saved
        if self.ar_opt is not None and "ar_optimizer" in extra:
            self.ar_opt.load_state_dict(extra["ar_optimizer"])
        self.state = loop.restore_checkpoint(ckpt, self.opt, self.sched)
        self.backend.sync_weights()
        return True

    # ------------------------------------------------------------ one step
    @contextmanager
    def _reference(self) -> Iterator[tuple[Any, Injector]]:
        vb = self.nla.verbalizer
        if self.ref is None:
            with self.nla.av_model.disable_adapter(), vb.injector() as inj:
                yield self.nla.av_model, inj
        else:
            inj = Injector(self.ref, vb.tokens, mode=vb.injection.mode, scale=vb.injection.scale,
                           inject_layer=vb.injection.layer, coef=vb.injection.coef)
            with inj:
                yield self.ref, inj

    def _texts(self, rollouts: list[Rollout]) -> list[str]:
        # The AR reads the parsed explanation; an unparseable answer is read as written.
        return [r.explanation if r.explanation is not None else r.raw for r in rollouts]

    def step(self, step: int) -> dict[str, Any]:
        """One GRPO step. Under ``accelerate launch`` each rank generates, reconstructs and
        updates on its contiguous share of the batch; rewards and advantages are computed on the
        gathered whole (a reward may compare rows, e.g. contrastive), gradients are summed."""
        cfg, dist = self.cfg, self.dist
        G = cfg.group_size
        idx = batch_indices(len(self.vectors), cfg.batch_size, step, cfg.seed)
        lo, hi = dist.share(len(idx))
        vecs_all = self.vectors[idx]
        vecs = vecs_all[lo:hi]

        t0 = time.perf_counter()
        local: list[Rollout] = []
        if hi > lo:
            # offset: the sampling streams are those of the same rows in a one-process run.
            local = self.backend.generate(vecs, G, self.sampling, seed=cfg.seed * 7919 + step, offset=lo)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.nla.ar.eval()
        local_recon = (self.nla.ar.reconstruct(self._texts(local)).float().cpu() if local
                       else torch.zeros(0, self.nla.meta.d_model))
        if dist.world > 1:
            rollouts = dist.gather([replace(r, vector_index=r.vector_index + lo) for r in local])
            recon = torch.cat([t for t in dist.gather([local_recon]) if len(t)] or [local_recon])
        else:
            rollouts, recon = local, local_recon
        row_vecs = vecs_all.repeat_interleave(G, 0)
        texts = self._texts(rollouts)
        invalid = [r.invalid for r in rollouts]
        rewards = score_rollouts(
            self.rewards, row_vecs, [r.explanation for r in rollouts], recon,
            invalid=invalid, invalid_reward=cfg.invalid_reward,
            raw=[r.raw for r in rollouts], token_ids=[r.completion_ids for r in rollouts],
            lengths=[len(r.completion_ids) for r in rollouts], truncated=[not r.finished for r in rollouts],
            groups=[i // G for i in range(len(rollouts))], group_size=G, step=step, seed=cfg.seed,
            mean_vector=self.mean,
        )
        reward_t = torch.tensor(rewards)
        adv = group_advantages(reward_t, G, cfg.normalize_std)
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = slice(lo * G, hi * G)
        n_scored = sum(1 for r in rollouts if r.completion_ids)
        upd = self._policy_update(rollouts[rows], row_vecs[rows], adv[rows], n_scored)
        self.backend.sync_weights()
        t_update = time.perf_counter() - t0

        t0 = time.perf_counter()
        ar_loss = self._ar_update(rollouts, row_vecs, step) if self.ar_opt is not None else float("nan")
        t_ar = time.perf_counter() - t0

        distinct = distinct_rate(texts)
        return {
            "reward": float(reward_t.mean()),
            "reward_std": float(reward_t.std()),
            "fve_nrm": metrics.fve_nrm(recon, row_vecs, self.mean),
            "mse_nrm": float(metrics.mse_nrm(recon, row_vecs).mean()),
            **upd,
            "ar_loss": ar_loss,
            "length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
            "distinct_rate": distinct,
            "collapse_alarm": distinct < cfg.collapse_threshold,
            "unparseable": sum(r.explanation is None for r in rollouts) / len(rollouts),
            "truncated": sum(not r.finished for r in rollouts) / len(rollouts),
            "lr": self.sched.get_last_lr()[0],
            "processes": dist.world,
            "sec_generate": t_gen,
            "sec_reward": t_reward,
            "sec_update": t_update,
            "sec_ar": t_ar,
            "example": texts[0][:200],
        }

    def _policy_update(self, rollouts: list[Rollout], row_vecs: torch.Tensor, adv: torch.Tensor,
                       n_scored: int) -> dict[str, Any]:
        """Policy step on this rank's rollouts; ``n_scored``: answers scored over all ranks (the
        loss is their mean, so the summed gradients equal one process's on the whole batch)."""
        cfg, vb, dist = self.cfg, self.nla.verbalizer, self.dist
        model = self.nla.av_model
        prompt = vb.prompt_ids()
        pad_id = vb.tokenizer.pad_token_id if vb.tokenizer.pad_token_id is not None else vb.end_ids[0]
        # An answer with no tokens (max_new_tokens hit at 0) cannot be scored; keep the rest.
        keep = [i for i, r in enumerate(rollouts) if r.completion_ids]
        mb = max(1, cfg.update_batch_size)
        chunks = [keep[s : s + mb] for s in range(0, len(keep), mb)]
        ref_lp: list[torch.Tensor | None] = [None] * len(chunks)
        if cfg.kl_coef > 0 and chunks:
            with torch.no_grad(), self._reference() as (ref_model, ref_inj):
                for c, chunk in enumerate(chunks):
                    ref_lp[c], _ = completion_logprobs(ref_model, ref_inj, prompt,
                                                       [rollouts[i].completion_ids for i in chunk],
                                                       row_vecs[chunk], cfg.temperature, pad_id)
        old_lp: list[torch.Tensor | None] = [None] * len(chunks)
        kl_first = float("nan")
        losses, norms, skipped = [], [], 0
        model.train()
        with vb.injector() as inj:
            for epoch in range(cfg.updates_per_batch):
                total_loss, kl_sum = 0.0, 0.0
                bad = False
                for c, chunk in enumerate(chunks):
                    logp, mask = completion_logprobs(model, inj, prompt, [rollouts[i].completion_ids for i in chunk],
                                                     row_vecs[chunk], cfg.temperature, pad_id)
                    if old_lp[c] is None:
                        old_lp[c] = logp.detach()  # the rollout-time policy: params have not moved yet
                    old = old_lp[c]
                    assert old is not None
                    seq_loss, seq_kl = grpo_token_loss(logp, old, ref_lp[c], adv[chunk].to(logp.device), mask,
                                                       cfg.kl_coef, cfg.clip_eps)
                    loss = seq_loss.sum() / max(n_scored, 1)
                    if not torch.isfinite(loss):
                        bad = True
                        break
                    loss.backward()
                    total_loss += float(loss.detach())
                    kl_sum += float(seq_kl.detach().sum())
                # Every rank skips together, or their weights would part ways.
                bad = not dist.all_true(not bad)
                total_loss, kl_sum = dist.sum_floats([total_loss, kl_sum])
                if epoch == 0:
                    kl_first = kl_sum / max(n_scored, 1)
                if bad:
                    self.opt.zero_grad(set_to_none=True)
                    stepped, norm = False, float("nan")
                else:
                    dist.sum_grads(self.policy_params)
                    stepped, norm = loop.guarded_step(self.opt, self.policy_params, cfg.max_grad_norm,
                                                      agree=dist.all_true)
                if not stepped:
                    skipped += 1
                    self.state.skipped_steps += 1
                    print(f"nla train rl: non-finite loss/gradient, step skipped (total {self.state.skipped_steps})",
                          file=sys.stderr)
                losses.append(total_loss)
                norms.append(norm)
        self.sched.step()
        return {"loss": losses[0] if losses else float("nan"), "kl": kl_first,
                "grad_norm": norms[0] if norms else float("nan"), "skipped": skipped}

    def _ar_update(self, rollouts: list[Rollout], row_vecs: torch.Tensor, step: int) -> float:
        """AR steps on the fresh explanations of the whole batch; each rank takes a share of each
        step's pick and the gradients are summed, so any process count takes the same steps."""
        cfg, dist = self.cfg, self.dist
        assert self.ar_opt is not None
        valid = [i for i, r in enumerate(rollouts) if not r.invalid]
        if not valid:
            return float("nan")
        ar = self.nla.ar
        ar.train()
        gen = torch.Generator().manual_seed(cfg.seed * 104_729 + step)
        losses = []
        for _ in range(cfg.ar_steps):
            pick = [valid[int(j)] for j in torch.randperm(len(valid), generator=gen)[: cfg.ar_batch_size]]
            lo, hi = dist.share(len(pick))
            mine = pick[lo:hi]
            loss = torch.zeros((), device=self.device)
            if mine:
                ids, mask = ar.encode([rollouts[i].explanation or "" for i in mine])
                pred = ar(ids.to(self.device), mask.to(self.device))
                loss = metrics.mse_nrm(pred, row_vecs[mine].to(pred.device)).sum() / len(pick)
            if not dist.all_true(bool(torch.isfinite(loss))):
                self.ar_opt.zero_grad(set_to_none=True)
                self.state.skipped_steps += 1
                continue
            if mine:
                loss.backward()
            dist.sum_grads(self.ar_params)
            loop.guarded_step(self.ar_opt, self.ar_params, cfg.max_grad_norm, agree=dist.all_true)
            losses.append(dist.sum_floats([float(loss.detach())])[0])
        ar.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out round trip (greedy AV → AR) on ``--eval-split``: the before/after figure."""
        if len(self.eval_vectors) == 0:
            return {}
        return evaluate_round_trip(self.nla, self.eval_vectors, self.mean, self.cfg.max_new_tokens)

    # ------------------------------------------------------------ run
    def train(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "train_config.yaml")
        logger = loop.MetricsLogger(self.out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                    wandb_project=cfg.wandb_project, enabled=main)
        resumed = cfg.resume and self.try_resume()
        if cfg.resume and not resumed and main:
            print(f"nla train rl: no checkpoint in {self.out}, starting fresh", file=sys.stderr)
        if not resumed:
            logger.truncate_after(-1, PHASE)
            logger.truncate_after(-1, "eval")
            before = self.evaluate() if main else {}
            if before:
                logger.log(0, before, phase="eval")
        else:
            logger.truncate_after(self.state.step, PHASE)
            logger.truncate_after(0, "eval")  # keep the before-RL figure, the after one is re-made
        bar = loop.Progress(cfg.steps, initial=self.state.step, desc="rl", enabled=cfg.progress and main)
        started = time.perf_counter()
        try:
            while self.state.step < cfg.steps:
                step = self.state.step
                record = self.step(step)
                self.state.step = step + 1
                if record["collapse_alarm"] and main:
                    print(f"nla train rl: WARNING mode collapse at step {step + 1}: only "
                          f"{record['distinct_rate']:.0%} of explanations distinct (< {cfg.collapse_threshold:.0%}); "
                          f"e.g. {record['example']!r}", file=sys.stderr)
                logger.log(self.state.step, record, phase=PHASE)
                bar.update(int(record["length"] * cfg.batch_size * cfg.group_size),
                           reward=record["reward"], kl=record["kl"], distinct=record["distinct_rate"])
                if self.state.step % cfg.save_every == 0 or self.state.step == cfg.steps:
                    self.save()
        finally:
            bar.close()
        self.state.done = True
        if not main:
            self.dist.barrier()  # the main process writes the bundle and the summary
            return {"rank": self.dist.rank}
        after = self.evaluate()
        if after:
            logger.log(cfg.steps, after, phase="eval")
        loop.publish_bundle(MergedSaver(self.nla), self.out)
        logger.close()
        loop.plot_metrics(self.out / loop.METRICS_FILE, self.out / loop.PLOT_FILE)
        summary = summarize_rl_run(self.out, cfg.collapse_threshold)
        summary["wall_s_this_session"] = round(time.perf_counter() - started, 1)
        summary["processes"] = self.dist.world
        write_json_atomic(self.out / SUMMARY_FILE, summary, default=str)
        self.dist.barrier()
        return summary


def evaluate_round_trip(nla: Any, vectors: torch.Tensor, mean: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    """Greedy round trip: fve_nrm etc. (nla.metrics), distinct-explanation rate, unparseable rate."""
    was = nla.av_model.training
    nla.av_model.eval()
    nla.ar.eval()
    try:
        trip = nla.round_trip(vectors, max_new_tokens=max_new_tokens)
    finally:
        nla.av_model.train(was)
    texts = [e if e is not None else r for e, r in zip(trip.explanations, trip.raw)]
    out: dict[str, Any] = {f"eval_{k}": v for k, v in metrics.summarize(trip.reconstructions, vectors, mean).items()}
    # fve_nrm alone can rise by hedging towards the mean; retrieval and the shuffled gap say
    # whether the explanations still single out their own vector.
    out["eval_top1"] = metrics.top1_retrieval(trip.reconstructions, vectors)
    out["eval_shuffled_gap"] = metrics.shuffled_gap(trip.reconstructions, vectors)
    out["eval_distinct_rate"] = distinct_rate(texts)
    out["eval_unparseable"] = sum(e is None for e in trip.explanations) / max(len(texts), 1)
    out["eval_example"] = texts[0][:200] if texts else ""
    return out


def summarize_rl_run(run_dir: Path, collapse_threshold: float) -> dict[str, Any]:
    """First/last figures of a run, and whether it mode-collapsed (never hidden)."""
    records = loop.read_metrics(run_dir / loop.METRICS_FILE)
    train = [r for r in records if r.get("phase") == PHASE]
    evals = [r for r in records if r.get("phase") == "eval"]
    alarms = [r["step"] for r in train if r.get("collapse_alarm")]
    summary: dict[str, Any] = {"steps": len(train), "collapse_alarm_steps": alarms}
    if train:
        k = max(1, len(train) // 5)
        summary["reward_first"] = sum(r["reward"] for r in train[:k]) / k
        summary["reward_last"] = sum(r["reward"] for r in train[-k:]) / k
        summary["distinct_rate_last"] = train[-1]["distinct_rate"]
        summary["sec_per_step"] = {ph: sum(r.get(f"sec_{ph}", 0.0) for r in train) / len(train)
                                   for ph in ("generate", "reward", "update", "ar")}
    if len(evals) >= 1:
        summary["eval_before"] = {k: v for k, v in evals[0].items() if k.startswith("eval_")}
        summary["eval_after"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    summary["hedging"] = _hedging(summary.get("eval_before", {}), summary.get("eval_after", {}))
    if summary["hedging"]:
        print("nla train rl: WARNING held-out fve_nrm rose while top-1 retrieval fell beyond noise: the gain "
              "is hedging towards the mean, not more informative explanations (docs/rl.md, 'Hedging')",
              file=sys.stderr)
    last_eval_distinct = evals[-1].get("eval_distinct_rate", 1.0) if evals else 1.0
    summary["collapsed"] = bool((train and train[-1]["distinct_rate"] < collapse_threshold)
                                or last_eval_distinct < collapse_threshold)
    if summary["collapsed"]:
        print(f"nla train rl: WARNING the run ended mode-collapsed (distinct-explanation rate below "
              f"{collapse_threshold:.0%}); see {run_dir / loop.METRICS_FILE}", file=sys.stderr)
    return summary


def _hedging(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """fve_nrm up while top-1 retrieval fell by more than two standard errors of its rate."""
    keys = ("eval_fve_nrm", "eval_top1", "eval_n")
    if not all(isinstance(d.get(k), (int, float)) for d in (before, after) for k in keys):
        return False
    p, n = float(before["eval_top1"]), max(int(before["eval_n"]), 1)
    noise = 2 * math.sqrt(max(p * (1 - p), 1 / n) / n)
    return bool(after["eval_fve_nrm"] > before["eval_fve_nrm"] and after["eval_top1"] < p - noise)


def train_rl(cfg: RLConfig, rewards: list[tuple[RewardFn, float]] | None = None) -> dict[str, Any]:
    """Run (or resume) RL; returns the run summary. ``rewards`` overrides ``cfg.reward``."""
    return RLTrainer(cfg, rewards=rewards).train()


# ---------------------------------------------------------------- CLI
def register_train(sub: Any) -> None:
    """Register ``nla train rl`` on the ``nla train`` subparsers."""
    from nla.config import add_config_args

    p = sub.add_parser("rl", help="joint RL (GRPO) of the AV against the AR on the 'rl' split",
                       description=(__doc__ or "").split("\n\n")[0])
    add_config_args(p, RLConfig)
    p.set_defaults(func=cmd_rl)


def cmd_rl(args: Any) -> int:
    from nla.config import resolve_config

    cfg = resolve_config(RLConfig, args, section="rl")
    summary = train_rl(cfg)
    if "rank" in summary:
        return 0  # a non-main process of `accelerate launch`: the main one reports
    keys = ("reward_first", "reward_last", "collapsed", "hedging")
    print(" ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                   for k in keys))
    for when in ("eval_before", "eval_after"):
        if when in summary:
            print(f"{when}: fve_nrm={summary[when].get('eval_fve_nrm', math.nan):.4f} "
                  f"top1={summary[when].get('eval_top1', math.nan):.3f} "
                  f"shuffled_gap={summary[when].get('eval_shuffled_gap', math.nan):.3f} "
                  f"distinct={summary[when].get('eval_distinct_rate', math.nan):.2f}")
    # A collapse is reported loudly (above, in the log and in rl_summary.json), not a crash.
    return 0


__all__ = ["RLConfig", "RLTrainer", "evaluate_round_trip", "train_rl"]
