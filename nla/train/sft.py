"""Warm-start SFT of the AV and the AR (docs/design.md §1, §4, §5): `nla train av|ar|sft`.

* **AV**: cross-entropy on the response tokens only (prompt and padding labelled −100), each
  row's vector injected at its marker; rows of the ``av_sft`` split with an explanation.
* **AR**: ``mse_nrm`` between the reconstruction of a row's explanation and its vector, on
  ``ar_sft``; the value head trains in fp32 (identity-initialised by the bundle).

One code path runs on one CPU and under ``accelerate launch`` (DDP): every process derives the
same data plan from the seed, takes its own slice of each global batch, and scales its summed
loss by ``world_size / global_count`` so that DDP's gradient average equals the gradient of the
mean over the *global* batch — a 2-process run then matches a 1-process run with the same
global batch up to float noise, whatever the per-process token counts.

Resume: the plan is a pure function of (seed, dataset, batch settings), so a checkpoint only
records how many optimizer steps are done; optimizer, scheduler and RNG state are restored.

Shape: :func:`train_sft` checks the settings, claims ``--out`` and runs one :class:`SFTTrainer`
per target (AV, then AR) on one bundle. The trainer has the RL trainer's methods
(:class:`nla.train.rl.RLTrainer`): set up in ``__init__``, then ``try_resume``, ``step``,
``evaluate``, ``save``, ``train``; logging, schedule, NaN guard and checkpoints are
:mod:`nla.train.loop`'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from nla import metrics
from nla.config import BUNDLE_ENTRIES, claim_output, config_to_dict, opt, validate
from nla.config_fields import LoggingFields, LoRAFields, RuntimeFields
from nla.errors import NLAError
from nla.meta import read_yaml, write_yaml
from nla.models.injection import check_vectors
from nla.models.loading import check_4bit_available, load_in_4bit
from nla.train import loop
from nla.train.adapt import av_explanations, mixed_rows

TARGETS = ("av", "ar")
CONFIG_FILE = "train_config.yaml"
# Settings that may change between a run and its resume without changing its results.
RESUME_FREE = frozenset({"resume", "force", "progress", "device", "tensorboard", "wandb", "wandb_project",
                         "stop_after_steps", "save_every", "keep_checkpoints"})
ADAPT = "ar_adapt"  # the phase after "ar" that adapts the AR to the AV's words (nla/train/adapt.py)
ADAPT_ANSWERS = "ar_adapt_answers.jsonl"  # the AV's cached answers, in the run folder
# What an SFT run writes into --out: --force removes exactly these (nla.config.claim_output).
SFT_OWNED = (*BUNDLE_ENTRIES, CONFIG_FILE, loop.METRICS_FILE, loop.PLOT_FILE, loop.CHECKPOINTS, ADAPT_ANSWERS,
             "tensorboard", "wandb")
# Settings renamed by the one config contract (docs/design.md §1): a run saved before the
# rename still resumes (its train_config.yaml is read with the new names).
_RENAMED = {"init": "nla", "precision": "dtype"}
_OLD_PRECISION = {"fp32": "float32", "bf16": "bfloat16"}
SPLIT_OF = {"av": "av_sft", "ar": "ar_sft"}


@dataclass
class SFTConfig(LoRAFields, RuntimeFields, LoggingFields):
    data: str = opt("", help="activation dataset folder with explanations (`nla label` fills them)", required=True)
    out: str = opt("", help="run folder: final bundle, checkpoints/, metrics.jsonl, curves.png, train_config.yaml",
                   required=True)
    nla: str | None = opt(None, help="start from this bundle (a previous run); default: a fresh bundle from --data's base model")
    model: str | None = opt(None, help="base model for a fresh bundle (default: the dataset's)")
    lora: bool = opt(True, help="train LoRA adapters (--no-lora: full fine-tuning)")
    lora_dropout: float = opt(0.0, help="LoRA dropout")
    lora_target_modules: list[str] = opt([], help="module names to adapt (default: all linear layers)")
    use_rslora: bool = opt(False, help="rank-stabilised LoRA scaling (alpha / sqrt(r))")
    injection_mode: Literal["replace", "add"] = opt("replace", help="how a fresh bundle's AV reads the vector: replace (the marker's embedding, the paper's) "
                              "or add (Karvonen: added to the output of block --inject-layer); an --nla bundle keeps its own")
    inject_layer: int = opt(1, help="add mode: the block whose output the vector is added to")
    inject_coef: float = opt(1.0, help="add mode: h ← h + coef·‖h‖·v/‖v‖")
    load_in_4bit: bool = opt(False, help="QLoRA: load the base weights in 4-bit NF4 (CUDA + bitsandbytes; LoRA only)")
    # Narrower than the shared dtype: mixed precision is bf16 autocast over fp32 weights or nothing.
    dtype: Literal["float32", "bfloat16"] = opt(  # type: ignore[assignment]
        "float32", choices=("float32", "bfloat16"),
        help="float32, or bfloat16 (autocast, fp32 master weights; the AR value head stays fp32)")
    lr: float = opt(2e-4, help="AV learning rate")
    ar_lr: float | None = opt(None, help="AR learning rate (default: --lr)")
    head_lr: float | None = opt(None, help="AR value-head learning rate (default: the AR learning rate)")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    batch_size: int = opt(8, help="rows per micro-batch per process")
    grad_accum: int = opt(1, help="micro-batches per optimizer step (global batch = batch_size × grad_accum × processes)")
    epochs: float = opt(1.0, help="passes over the training split (fractions allowed)")
    max_steps: int | None = opt(None, help="optimizer steps per model (overrides --epochs)")
    ar_max_steps: int | None = opt(None, help="AR optimizer steps (default: --max-steps)")
    ar_adapt_steps: int = opt(0, help="after the AR phase, AR steps on the AV's own (greedy) explanations of --ar-adapt-rows "
                              "ar_sft rows, mixed with teacher labels: the AR learns what the AV's words are worth (0: off)", ge=0)
    ar_adapt_rows: int = opt(512, help="ar_adapt: ar_sft rows the AV explains (a seeded sample; answers cached in --out)",
                             ge=1)
    ar_adapt_lr: float = opt(2e-4, help="ar_adapt: AR learning rate (the value head keeps its AR-phase ratio --head-lr/--ar-lr)")
    ar_adapt_teacher_fraction: float = opt(0.5, help="ar_adapt: fraction of rows that are teacher labels", ge=0, lt=1)
    ar_adapt_max_new_tokens: int = opt(72, help="ar_adapt: most tokens per AV answer (as `nla eval --max-new-tokens`)",
                                       ge=1)
    warmup_ratio: float = opt(0.05, help="fraction of steps of linear warm-up before the cosine decay")
    min_lr_ratio: float = opt(0.0, help="the cosine decays to this fraction of the learning rate")
    max_grad_norm: float = opt(1.0, help="gradient clipping norm (0: off)")
    max_length: int = opt(256, help="longest training sequence in tokens (AV answers are cut, AR inputs cut in the middle)")
    gradient_checkpointing: bool = opt(False, help="recompute activations in the backward pass (less memory, ~30% slower)")
    group_by_length: bool = opt(True, help="batch rows of similar length together (less padding)")
    eval_every: int = opt(50, help="evaluate on --eval-split every N steps (0: only at start and end)")
    eval_rows: int = opt(128, help="held-out rows used per evaluation")
    eval_split: str = opt("eval", help="split evaluated during training; tune settings with `rl` so `eval` stays untouched")
    save_every: int = opt(100, help="save a checkpoint (a complete bundle) every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, help="checkpoints kept per model")
    log_every: int = opt(1, help="write train metrics every N steps")
    resume: bool = opt(False, help="continue from the last checkpoint in --out (same data order)")
    force: bool = opt(False, help="start over in an --out that holds a run (or other files): replaces only SFT's own files")
    stop_after_steps: int | None = opt(None, help="stop after this many optimizer steps in this invocation (resume later)")


# ---------------------------------------------------------------- data plan
@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # AV: tokens before the answer (masked); AR: unused (0)
    row: int  # index into the split's vectors


def plan_steps(lengths: list[int], global_batch: int, seed: int, epochs: float, max_steps: int | None,
               group_by_length: bool) -> list[list[int]]:
    """Row indices of every optimizer step of the run, derived only from the seed.

    Length grouping follows the usual mega-batch scheme: shuffle, cut into windows of 32 global
    batches, sort each window by length, cut into batches, shuffle the batches — similar lengths
    share a batch, yet the order stays random. Incomplete last batches are dropped so every
    process gets a full share.
    """
    n = len(lengths)
    if n < global_batch:
        raise NLAError(f"only {n} training rows for a global batch of {global_batch}; lower --batch-size/--grad-accum")
    per_epoch = n // global_batch
    total = max_steps if max_steps is not None else max(1, math.floor(epochs * per_epoch))
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        batches: list[list[int]] = []
        if group_by_length:
            window = global_batch * 32
            for start in range(0, n, window):
                chunk = sorted(perm[start : start + window], key=lambda i: -lengths[i])
                batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
            batches = [b for b in batches if len(b) == global_batch]
            order = torch.randperm(len(batches), generator=gen).tolist()
            batches = [batches[i] for i in order]
        else:
            batches = [perm[i : i + global_batch] for i in range(0, per_epoch * global_batch, global_batch)]
        steps += batches
        epoch += 1
    return steps[:total]


def micro_batches(step_rows: list[int], lengths: list[int], batch_size: int, grad_accum: int,
                  world: int, rank: int) -> list[list[int]]:
    """This process's ``grad_accum`` micro-batches of one global batch (similar lengths together)."""
    rows = sorted(step_rows, key=lambda i: -lengths[i])
    parts = [rows[k * batch_size : (k + 1) * batch_size] for k in range(grad_accum * world)]
    return [parts[a * world + rank] for a in range(grad_accum)]


def padding_fraction(plan: list[list[int]], lengths: list[int], batch_size: int) -> float:
    """Share of the tokens in padded micro-batches that are padding."""
    total = real = 0
    for step in plan:
        rows = sorted(step, key=lambda i: -lengths[i])
        for k in range(0, len(rows), batch_size):
            mb = [lengths[i] for i in rows[k : k + batch_size]]
            total += max(mb) * len(mb)
            real += sum(mb)
    return 1 - real / max(total, 1)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------- tasks
class Task:
    """What differs between AV and AR training: the examples, the module, the loss."""

    name: str
    split: str

    def __init__(self, nla: Any, cfg: SFTConfig):
        self.nla = nla
        self.cfg = cfg

    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        raise NotImplementedError

    def loss_sum(self, model: torch.nn.Module, batch: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, int]:
        """(summed loss over the batch's loss units, number of units)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, examples: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def pad_id(self) -> int:
        tok = self.nla.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else 0)


class AVTask(Task):
    name, split = "av", "av_sft"

    def __init__(self, nla: Any, cfg: SFTConfig):
        super().__init__(nla, cfg)
        self.injector = nla.verbalizer.injector()

    def module(self) -> torch.nn.Module:
        return self.nla.av_model

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        out = []
        for i, r in enumerate(rows):
            # A universal dataset (docs/design.md §9) names each row's model; the AV reads it as text.
            ids, n_prompt = self.nla.verbalizer.training_example(r["explanation"], r.get("tag"))
            if n_prompt >= self.cfg.max_length:
                raise NLAError(f"--max-length {self.cfg.max_length} is shorter than the AV prompt ({n_prompt} tokens)")
            out.append(Example(ids[: self.cfg.max_length], n_prompt, i))
        return out

    def loss_sum(self, model: torch.nn.Module, batch: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, int]:
        ids, mask = pad_right([e.ids for e in batch], self.pad_id())
        labels = av_labels(ids, mask, [e.n_prompt for e in batch])
        self.injector.set_vectors(vectors[[e.row for e in batch]])
        # Logits only from the last prompt token on: the LM head and the log-softmax over the
        # vocabulary on prompt positions (most of an AV example) would be computed and masked.
        start = max(min(e.n_prompt for e in batch) - 1, 0)
        keep = torch.arange(start, ids.shape[1] - 1, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       logits_to_keep=keep).logits
        # Shifted: the logits at t predict token t+1. fp32 for the log-softmax under bf16.
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels[:, start + 1 :].reshape(-1).to(device),
            ignore_index=-100, reduction="sum",
        )
        return loss, int((labels[:, 1:] != -100).sum())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> dict[str, float]:
        total, count = 0.0, 0
        for start in range(0, len(examples), self.cfg.batch_size):
            loss, n = self.loss_sum(model, examples[start : start + self.cfg.batch_size], vectors, device)
            total, count = total + float(loss), count + n
        return {"loss": total / max(count, 1)}


def av_labels(ids: torch.Tensor, mask: torch.Tensor, n_prompt: list[int]) -> torch.Tensor:
    """Labels = ids on the answer, −100 on the prompt and on padding (no loss there)."""
    labels = ids.clone()
    labels[mask == 0] = -100
    for r, n in enumerate(n_prompt):
        labels[r, :n] = -100
    return labels


class ARTask(Task):
    name, split = "ar", "ar_sft"

    def __init__(self, nla: Any, cfg: SFTConfig, mean: torch.Tensor):
        super().__init__(nla, cfg)
        self.mean = mean
        nla.ar.max_length = cfg.max_length

    def module(self) -> torch.nn.Module:
        return self.nla.ar

    def examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        return [Example(self.nla.ar.token_ids(r["explanation"]), 0, i) for i, r in enumerate(rows)]

    def predict(self, model: torch.nn.Module, batch: list[Example], device: torch.device) -> torch.Tensor:
        ids, mask = pad_right([e.ids for e in batch], self.pad_id())
        return model(ids.to(device), mask.to(device))

    def loss_sum(self, model: torch.nn.Module, batch: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, int]:
        pred = self.predict(model, batch, device)
        target = vectors[[e.row for e in batch]].to(device)
        return metrics.mse_nrm(pred, target).sum(), len(batch)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list[Example], vectors: torch.Tensor,
                 device: torch.device) -> dict[str, float]:
        preds = [self.predict(model, examples[s : s + self.cfg.batch_size], device).float().cpu()
                 for s in range(0, len(examples), self.cfg.batch_size)]
        pred = torch.cat(preds)
        target = vectors[[e.row for e in examples]]
        out = metrics.summarize(pred, target, self.mean)
        return {k: float(v) for k, v in out.items() if k != "n"}


def with_tags(dataset: Any, split: str) -> list[dict[str, Any]]:
    """The split's rows plus the optional ``tag`` column of universal datasets (None elsewhere)."""
    rows = dataset.rows(split)
    # A missing column reads as nulls, so ordinary datasets are unaffected.
    tags = dataset.table(["tag"], split=split).column("tag").to_pylist()
    for row, tag in zip(rows, tags, strict=True):
        row["tag"] = tag
    return rows


def labelled(rows: list[dict[str, Any]], vectors: torch.Tensor) -> tuple[list[dict[str, Any]], torch.Tensor]:
    keep = [i for i, r in enumerate(rows) if r.get("explanation")]
    return [rows[i] for i in keep], vectors[keep] if keep else vectors[:0]


# ---------------------------------------------------------------- the run
def _upgrade_saved_config(run: Path) -> None:
    """Rewrite a train_config.yaml saved before the rename (``init``, ``precision: fp32``) with the
    new names, so the guard compares like with like and the old run still resumes."""
    saved = run / CONFIG_FILE
    if not saved.is_file():
        return
    data = read_yaml(saved)
    if not any(old in data and new not in data for old, new in _RENAMED.items()):
        return
    for old, new in _RENAMED.items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    if "dtype" in data:
        data["dtype"] = _OLD_PRECISION.get(data["dtype"], data["dtype"])
    write_yaml(saved, data)


def claim_run_dir(cfg: SFTConfig, targets: list[str]) -> None:
    """The shared output guard (nla.config.claim_output) plus SFT's own rule: a resume trains the same targets."""
    run = Path(cfg.out)
    _upgrade_saved_config(run)
    claim_output(run, command="train sft", force=cfg.force, resume=cfg.resume, owned=SFT_OWNED,
                 config_file=CONFIG_FILE, settings=config_to_dict(cfg), free=RESUME_FREE)
    saved = run / CONFIG_FILE
    if cfg.resume and saved.is_file():
        old = read_yaml(saved).get("targets")
        if old not in (None, targets):
            raise NLAError(f"{run}: the run trains {old}, this command trains {targets}")


def check_training_data(cfg: SFTConfig, dataset: Any, targets: list[str]) -> None:
    """What would make a target's training meaningless, refused before anything is written.

    NaN/inf vectors train to NaN scores and all-zero vectors have no direction to learn
    (docs/design.md, "Key invariants"); a split without explanations has nothing to learn from.
    """
    for target in targets:
        split = SPLIT_OF[target]
        vectors = dataset.vectors(split)
        if len(vectors):
            try:
                check_vectors(vectors)
            except NLAError as exc:
                raise NLAError(f"{cfg.data}: split {split!r}: {exc}; re-extract the dataset") from None
        del vectors
        labels = dataset.table(["explanation"], split=split).column("explanation").to_pylist()
        if not any(labels):
            raise NLAError(f"{cfg.data}: no labelled rows in split {split!r}; run `nla label --data {cfg.data}` first")


def check_bundle_fits(nla: Any, cfg: SFTConfig, dataset: Any) -> None:
    """An --nla bundle reads the dataset's layer at the dataset's width (one line naming both values)."""
    meta = nla.meta
    if dataset.meta.d_model != meta.d_model:
        raise NLAError(f"dataset {cfg.data} has d_model={dataset.meta.d_model}, bundle {cfg.nla} has "
                       f"d_model={meta.d_model}")
    # -1: a dataset written before layers were recorded (nla.data.store); nothing to compare.
    if dataset.meta.layer_index not in (-1, meta.layer_index):
        raise NLAError(f"dataset {cfg.data} is layer {dataset.meta.layer_index}, bundle {cfg.nla} reads layer "
                       f"{meta.layer_index}")


def make_accelerator(cfg: SFTConfig) -> Any:
    from accelerate import Accelerator

    # accelerate keeps one state per process, fixed by the first Accelerator: a second run in
    # the same process (the Python API) with another precision or device would be refused.
    # Reset the per-run settings; keep the process group of a distributed launch.
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    single = PartialState._shared_state.get("distributed_type", DistributedType.NO) == DistributedType.NO
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no")


def lora_settings(cfg: SFTConfig) -> Any:
    from nla.bundle import LoraSettings

    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules) or "all-linear", use_rslora=cfg.use_rslora)


def _load(cfg: SFTConfig, path: Path, device: torch.device) -> Any:
    """A checkpoint to continue training from (in 4-bit again when the run is QLoRA)."""
    from nla.bundle import NLA

    with load_in_4bit(cfg.load_in_4bit, device):
        return NLA.from_pretrained(path, device=str(device), is_trainable=True)


def start_bundle(cfg: SFTConfig, device: torch.device, dataset: Any = None) -> Any:
    with load_in_4bit(cfg.load_in_4bit, device):
        return _start_bundle(cfg, device, dataset)


def _start_bundle(cfg: SFTConfig, device: torch.device, dataset: Any = None) -> Any:
    from nla.bundle import NLA

    if cfg.nla:
        nla = NLA.from_pretrained(cfg.nla, device=str(device), is_trainable=True)
        if dataset is not None:
            check_bundle_fits(nla, cfg, dataset)
        if cfg.lora and nla.meta.av_format != "peft":
            nla.add_lora(lora_settings(cfg))
        return nla
    torch.manual_seed(cfg.seed)  # LoRA B is zero, A random: seeded so runs are repeatable
    return NLA.initialize(cfg.model, dataset=cfg.data, lora=lora_settings(cfg) if cfg.lora else None,
                          injection_mode=cfg.injection_mode, inject_layer=cfg.inject_layer,
                          inject_coef=cfg.inject_coef, device=str(device))


def check_settings(cfg: SFTConfig, targets: list[str] | None) -> list[str]:
    """The targets to train, after the checks that need no file (one-line errors, nothing written)."""
    from nla.data.store import SPLITS

    chosen = list(targets or TARGETS)
    for t in chosen:
        if t not in TARGETS:
            raise NLAError(f"unknown training target {t!r} (choose from {', '.join(TARGETS)})")
    validate(cfg, "train")  # the Python API gets the same checks as flags and YAML
    if cfg.eval_split not in SPLITS:
        raise NLAError(f"train: --eval-split {cfg.eval_split!r} is not a split (choose from {', '.join(SPLITS)})")
    if cfg.load_in_4bit:
        if not cfg.lora:
            raise NLAError("--load-in-4bit trains LoRA adapters on frozen 4-bit weights; --no-lora cannot update them")
        check_4bit_available(cfg.device)  # before anything is written
    # A missing --tensorboard/--wandb package stops the command here, not after the run folder is claimed.
    loop.check_logging_backends(cfg.tensorboard, cfg.wandb)
    return chosen


def train_sft(cfg: SFTConfig, targets: list[str] | None = None) -> Any:
    """Train the AV and/or the AR; returns the trained :class:`~nla.bundle.NLA` (also saved in ``--out``).

    One :class:`SFTTrainer` per target, in order, on one bundle: the AR phase starts from the
    bundle the AV phase ended with. On ``--resume`` a finished phase is skipped (its last
    checkpoint is the bundle to continue from) and an unfinished one continues from its newest
    checkpoint. ``--stop-after-steps`` counts steps over the phases of this invocation.
    """
    from nla.bundle import NLA
    from nla.data.store import ActivationDataset

    targets = check_settings(cfg, targets)
    dataset = ActivationDataset.open(cfg.data)
    check_training_data(cfg, dataset, targets)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    run = Path(cfg.out)
    if accelerator.is_main_process:
        claim_run_dir(cfg, targets)
    # The start bundle loads before the run's settings are saved: a start that fails (a bundle
    # that does not load or does not fit the dataset) leaves no train_config.yaml behind, so the
    # same command run again is not refused with "pass --resume" (docs/guarantees.md).
    resuming = cfg.resume and any(loop.latest_checkpoint(run, t) is not None for t in targets)
    nla: Any = None if resuming else start_bundle(cfg, device, dataset)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        data = config_to_dict(cfg)
        data["targets"] = targets
        write_yaml(run / CONFIG_FILE, data)
    accelerator.wait_for_everyone()
    logger = loop.MetricsLogger(run, tensorboard=cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                                enabled=accelerator.is_main_process)
    done_ck: Path | None = None
    phases = list(targets)
    # Adapting the AR to the AV's words needs a trained AV: this run's, or the --nla bundle's.
    if "ar" in targets and cfg.ar_adapt_steps > 0 and ("av" in targets or cfg.nla):
        phases.append(ADAPT)
    budget = cfg.stop_after_steps  # steps left in this invocation, over all phases
    try:
        for target in phases:
            ck = loop.latest_checkpoint(run, target) if cfg.resume else None
            if ck is not None and loop.load_trainer_state(ck).done:
                nla, done_ck = None, ck
                continue
            if ck is not None:
                nla = _load(cfg, ck, device)
            elif nla is None:
                nla = _load(cfg, done_ck, device) if done_ck else start_bundle(cfg, device, dataset)
            if budget is not None and budget <= 0:
                if accelerator.is_main_process:
                    print(f"{run}: stopped after --stop-after-steps; re-run with --resume to continue")
                return nla
            if is_fsdp(accelerator):
                # FSDP flattens and shards each wrapped model's parameters in place; a tensor
                # the other model also points at would be torn out from under it.
                nla.unshare_frozen_base()
            trainer = SFTTrainer(cfg, target, nla, dataset, accelerator, logger)
            finished = trainer.train(resume_from=ck, max_steps_now=budget)
            if budget is not None:
                budget -= trainer.steps_taken
            if not finished:
                if accelerator.is_main_process:
                    print(f"{run}: stopped after --stop-after-steps; re-run with --resume to continue")
                return nla
            if is_fsdp(accelerator):
                # The live modules are sharded now: the next phase and the final bundle start
                # from the complete weights of the phase's last checkpoint.
                last = loop.latest_checkpoint(run, target)
                assert last is not None
                nla = _load(cfg, last, device)
        if nla is None:  # every phase was already done: the last checkpoint is the result
            assert done_ck is not None
            nla = NLA.from_pretrained(done_ck, device=str(device))
        if accelerator.is_main_process:
            loop.publish_bundle(nla, run)
            loop.plot_metrics(run / loop.METRICS_FILE, run / loop.PLOT_FILE)
            print(f"{run}: bundle with trained {' and '.join(t.upper() for t in targets)} saved; "
                  f"curves in {run / loop.PLOT_FILE}")
        accelerator.wait_for_everyone()
    finally:
        logger.close()
    return nla


class SFTTrainer:
    """One SFT phase, the AV on ``av_sft`` or the AR on ``ar_sft``, with the RL trainer's shape.

    ``__init__`` sets up (rows, data plan, optimizer, schedule, accelerate); :meth:`try_resume`
    restores a checkpoint's optimizer, schedule and RNG; :meth:`step` is one optimizer step of
    the plan; :meth:`evaluate` scores the held-out rows; :meth:`save` writes a checkpoint;
    :meth:`train` runs them to the end of the plan or of this invocation's step budget. The
    bundle ``nla`` is the caller's (a fresh one, or loaded from the checkpoint to resume from);
    the trainer updates its weights in place.
    """

    def __init__(self, cfg: SFTConfig, target: str, nla: Any, dataset: Any, accelerator: Any,
                 logger: loop.MetricsLogger):
        self.cfg, self.target, self.nla = cfg, target, nla
        self.accelerator, self.logger = accelerator, logger
        self.device = accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = bool(accelerator.is_main_process)
        self.task: Task
        ar_lr = cfg.ar_lr if cfg.ar_lr is not None else cfg.lr
        if target == "av":
            self.task = AVTask(nla, cfg)
            self.lr = cfg.lr
            max_steps = cfg.max_steps
        else:
            self.task = ARTask(nla, cfg, dataset.mean_vector().float())
            self.lr = ar_lr if target == "ar" else cfg.ar_adapt_lr
            max_steps = cfg.ar_adapt_steps if target == ADAPT else (
                cfg.ar_max_steps if cfg.ar_max_steps is not None else cfg.max_steps)
        # The value head keeps the ratio to the trunk's learning rate it had in the AR phase.
        self.head_lr = (cfg.head_lr if cfg.head_lr is not None else ar_lr) * self.lr / ar_lr

        rows, self.vectors = labelled(with_tags(dataset, self.task.split), dataset.vectors(self.task.split))
        if not rows:
            raise NLAError(f"{cfg.data}: no labelled rows in split {self.task.split!r}; "
                           f"run `nla label --data {cfg.data}` first")
        if target == ADAPT:
            rows, self.vectors = self._adaptation_rows(rows, self.vectors)
        self.n_rows = len(rows)
        eval_rows, eval_vectors = labelled(with_tags(dataset, cfg.eval_split), dataset.vectors(cfg.eval_split))
        eval_rows, self.eval_vectors = eval_rows[: cfg.eval_rows], eval_vectors[: cfg.eval_rows]
        self.examples = self.task.examples(rows)
        self.eval_examples = self.task.examples(eval_rows)
        self.lengths = [len(e.ids) for e in self.examples]
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.plan = plan_steps(self.lengths, self.global_batch, cfg.seed, cfg.epochs, max_steps, cfg.group_by_length)
        self.total = len(self.plan)
        self.padding = padding_fraction(self.plan, self.lengths, cfg.batch_size)
        ungrouped = plan_steps(self.lengths, self.global_batch, cfg.seed, cfg.epochs, max_steps, False)
        self.padding_ungrouped = padding_fraction(ungrouped, self.lengths, cfg.batch_size)

        self.module = self.task.module()
        if cfg.gradient_checkpointing:
            inner: Any = self.module.trunk if target != "av" else self.module
            inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
            # Non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads.
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise NLAError(f"the {target.upper()} has no trainable parameters")
        optimizer = self._optimizer()
        self.scheduler = loop.cosine_with_warmup(optimizer, round(cfg.warmup_ratio * self.total), self.total,
                                                 cfg.min_lr_ratio)
        self.state = loop.TrainerState(phase=target, step=0, total_steps=self.total)
        self.steps_taken = 0  # optimizer steps in this invocation (the --stop-after-steps budget)
        # The scheduler must not be prepared: accelerate would step it once per process.
        self.model, self.optimizer = accelerator.prepare(self.module, optimizer)
        self.fsdp = is_fsdp(accelerator)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if self.target == "av":
            return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        # The value head may take its own learning rate (--head-lr).
        head = list(self.nla.ar.value_head.parameters())
        head_ids = {id(p) for p in head}
        groups = [{"params": [p for p in self.params if id(p) not in head_ids], "lr": self.lr},
                  {"params": head, "lr": self.head_lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    def _adaptation_rows(self, rows: list[dict[str, Any]], vectors: torch.Tensor) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """ar_adapt's rows: the AV's answers for a seeded sample of the split's rows, plus teacher rows.

        Every process generates the same greedy answers; the main one caches them in --out, so a
        killed run asks the AV again only for the chunks it lacks.
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        picked = sorted(torch.randperm(len(rows), generator=gen)[: cfg.ar_adapt_rows].tolist())
        keys = [f"{rows[i].get('doc_id')}\x00{rows[i].get('position')}" for i in picked]
        texts = av_explanations(
            self.nla.verbalizer, vectors[picked], keys, cache=Path(cfg.out) / ADAPT_ANSWERS if self.main else None,
            max_new_tokens=cfg.ar_adapt_max_new_tokens, batch_size=max(cfg.batch_size, 32),
            progress=cfg.progress and self.main)
        av_rows = [{**rows[i], "explanation": t, "_row": i} for i, t in zip(picked, texts, strict=True)]
        teacher = [{**r, "_row": i} for i, r in enumerate(rows)]
        mixed = mixed_rows(av_rows, teacher, cfg.ar_adapt_teacher_fraction, cfg.seed)
        return mixed, vectors[[r["_row"] for r in mixed]]

    # ------------------------------------------------------------ checkpoints
    def try_resume(self, ckpt: Path | None) -> bool:
        """Continue from ``ckpt`` (the checkpoint the bundle was loaded from); False: start over.

        Either way ``metrics.jsonl`` is cut back to where the phase restarts, so a resumed run
        logs the curve of an uninterrupted one, each step once.
        """
        target = self.target
        if ckpt is None:
            # An earlier invocation may have logged steps of this phase before it was stopped or
            # killed ahead of its first checkpoint: they are run again from step 0.
            self.logger.truncate_after(-1, target)
            self.logger.truncate_after(-1, f"{target}_eval")
            return False
        self.state = loop.restore_checkpoint(ckpt, self.optimizer, self.scheduler)
        if self.state.total_steps != self.total:
            raise NLAError(f"{ckpt}: the checkpoint's plan has {self.state.total_steps} steps, this run {self.total}; "
                           "resume with the same data and batch settings")
        self.logger.truncate_after(self.state.step, target)
        self.logger.truncate_after(self.state.step, f"{target}_eval")
        return True

    def save(self) -> None:
        """A checkpoint (a complete bundle + trainer state); at the end of the plan it is marked
        done and the bundle's sidecar records how the model was trained."""
        cfg, target, state = self.cfg, self.target, self.state
        state.done = state.step == self.total
        if state.done:
            self.nla.meta.training[target] = {
                "steps": self.total, "rows": self.n_rows, "global_batch": self.global_batch, "lr": self.lr,
                "lora": cfg.lora, "skipped_steps": state.skipped_steps, "seed": cfg.seed,
            }
        # Under FSDP every process takes part in gathering the full weights; the optimizer
        # state stays out (each process holds only its shard of it).
        full = self.accelerator.get_state_dict(self.model) if self.fsdp else None
        if self.main:
            loop.save_checkpoint(
                cfg.out, self.nla, state, None if self.fsdp else self.optimizer, self.scheduler,
                keep=cfg.keep_checkpoints,
                write_weights=functools.partial(write_full_weights, self.nla, target, full) if self.fsdp else None)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based) of the plan: this process's micro-batches of the
        global batch, the loss normalised over the global batch, a guarded optimizer step."""
        cfg, accelerator, device = self.cfg, self.accelerator, self.device
        started = time.perf_counter()
        step_rows = self.plan[step]
        mbs = micro_batches(step_rows, self.lengths, cfg.batch_size, cfg.grad_accum, self.world, self.rank)
        # Loss units (AV: answer tokens, AR: rows) in the whole global batch: every process
        # knows the plan, so it can normalise by the global count without communicating.
        if self.target == "av":
            global_units = sum(_answer_tokens(self.examples[i]) for i in step_rows)
        else:
            global_units = len(step_rows)
        loss_total = torch.zeros((), device=device)
        tokens = 0
        for a, mb in enumerate(mbs):
            batch = [self.examples[i] for i in mb]
            tokens += sum(len(e.ids) for e in batch)
            # DDP all-reduces the gradients on the last micro-batch only.
            sync = a == len(mbs) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
                loss_sum, _ = self.task.loss_sum(self.model, batch, self.vectors, device)
                accelerator.backward(loss_sum * (self.world / global_units))
            loss_total += loss_sum.detach().float()
        loss_global = float(accelerator.reduce(loss_total, reduction="sum")) / global_units
        agree, clip = (self._agree, self._clip) if self.fsdp else (None, None)
        stepped, grad_norm = loop.guarded_step(self.optimizer, self.params, cfg.max_grad_norm or None,
                                               agree=agree, clip=clip)
        self.scheduler.step()
        tokens_global = int(accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum"))
        elapsed = time.perf_counter() - started
        return {"loss": loss_global, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "skipped": not stepped, "tokens": tokens_global, "step_s": elapsed,
                "tokens_per_s": tokens_global / max(elapsed, 1e-9)}

    # Under FSDP each process sees only its shard of the gradients: skip or step together, and
    # clip by the norm of the whole model (FSDP's own clip_grad_norm_ all-reduces it).
    def _agree(self, finite: bool) -> bool:
        flags = self.accelerator.reduce(torch.tensor(float(finite), device=self.device), reduction="sum")
        return bool(flags.item() == self.world)

    def _clip(self, limit: float) -> torch.Tensor:
        return self.model.clip_grad_norm_(limit)  # type: ignore[no-any-return]

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """The task's held-out scores on the first ``--eval-rows`` labelled rows of ``--eval-split``."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        try:
            return self.task.evaluate(self.model, self.eval_examples, self.eval_vectors, self.device)
        finally:
            self.model.train()

    def _log_start(self) -> None:
        """Step 0: the untrained scores, the AR's mean-direction baseline, the plan's padding."""
        if self.main:
            print(f"train {self.target}: {self.n_rows} rows, {self.total} steps of {self.global_batch} rows "
                  f"({self.world} process{'es' if self.world > 1 else ''}); padding {self.padding:.1%} "
                  f"(ungrouped: {self.padding_ungrouped:.1%})")
        start = self.evaluate()
        if isinstance(self.task, ARTask) and self.eval_examples:
            # The mean-direction baseline the AR has to beat (docs/design.md §6).
            const = self.task.mean.unsqueeze(0).expand(len(self.eval_vectors), -1)
            start["baseline_fve_nrm"] = metrics.fve_nrm(const, self.eval_vectors, self.task.mean)
        self.logger.log(0, {**start, "padding_fraction": self.padding,
                            "padding_fraction_ungrouped": self.padding_ungrouped,
                            "processes": self.world, "global_batch": self.global_batch}, phase=f"{self.target}_eval")

    # ------------------------------------------------------------ run
    def train(self, resume_from: Path | None = None, max_steps_now: int | None = None) -> bool:
        """Train to the end of the plan (True) or until ``max_steps_now`` steps were taken in this
        invocation (False: ``--resume`` continues from the last checkpoint)."""
        cfg, target = self.cfg, self.target
        self.try_resume(resume_from)
        state = self.state
        log_every = max(cfg.log_every, 1)
        bar = loop.Progress(self.total, state.step, desc=f"train {target}", enabled=cfg.progress and self.main)
        injecting = self.task.injector if isinstance(self.task, AVTask) else contextlib.nullcontext()
        try:
            with injecting:
                if state.step == 0:
                    self._log_start()
                while state.step < self.total:
                    if max_steps_now is not None and self.steps_taken >= max_steps_now:
                        return False
                    record = self.step(state.step)
                    state.step += 1
                    self.steps_taken += 1
                    if record["skipped"]:
                        state.skipped_steps += 1
                        if self.main:
                            print(f"train {target}: step {state.step}: NaN/inf gradient, step skipped")
                    bar.update(record["tokens"], loss=record["loss"])
                    last = state.step == self.total
                    if state.step % log_every == 0 or last or record["skipped"]:
                        self.logger.log(state.step, record, phase=target)
                    if last or (cfg.eval_every and state.step % cfg.eval_every == 0):
                        self.logger.log(state.step, self.evaluate(), phase=f"{target}_eval")
                    if last or (cfg.save_every and state.step % cfg.save_every == 0):
                        self.save()
        finally:
            bar.close()
        self.module.eval()
        return True


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return bool(accelerator.distributed_type == DistributedType.FSDP)


def write_full_weights(nla: Any, target: str, state_dict: dict[str, torch.Tensor] | None, path: Path) -> None:
    """Rewrite the trained model's weights in a saved bundle from a full (gathered) state dict.

    Under FSDP the live modules hold only this process's flat shard, so the bundle that
    ``save_pretrained`` just wrote has wrong weights for the model being trained. The keys are
    those of the unwrapped module's ``state_dict()`` (what ``accelerator.get_state_dict`` gives).
    """
    from safetensors.torch import save_file

    from nla.names import VALUE_HEAD_FILE

    if state_dict is None:
        raise NLAError("FSDP checkpoint: no gathered state dict on the main process")
    if target == "av":
        _unwrapped(nla.av_model).save_pretrained(path / "av", state_dict=state_dict)
        return
    trunk = {k.removeprefix("trunk."): v for k, v in state_dict.items() if k.startswith("trunk.")}
    head = {k.removeprefix("value_head."): v.detach().float().cpu().contiguous()
            for k, v in state_dict.items() if k.startswith("value_head.")}
    if not trunk or "weight" not in head:
        raise NLAError(f"FSDP checkpoint: unexpected AR state dict keys {sorted(state_dict)[:4]}...")
    _unwrapped(nla.ar.trunk).save_pretrained(path / "ar", state_dict=trunk)
    save_file(head, str(path / "ar" / VALUE_HEAD_FILE))


def _unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)


def _answer_tokens(e: Example) -> int:
    """Tokens that carry loss: the answer, minus the first (predicted from the prompt's last)."""
    return len(e.ids) - e.n_prompt


# ---------------------------------------------------------------- CLI
def _command(target: str | None) -> Callable[[Any], Any]:
    from nla.config import resolve_config

    def run(args: Any) -> int:
        cfg = resolve_config(SFTConfig, args, section="sft")
        train_sft(cfg, [target] if target else list(TARGETS))
        return 0

    return run


def register_train(sub: Any) -> None:
    """Add ``av``, ``ar`` and ``sft`` under ``nla train``."""
    from nla.config import add_config_args

    helps = {
        "av": "SFT of the activation verbalizer: vector → teacher explanation (split av_sft)",
        "ar": "SFT of the activation reconstructor: explanation → vector, mse_nrm loss (split ar_sft)",
        "sft": "both: the AV, then the AR, into one bundle",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text + ". Layer K is the dataset's: the output of decoder "
                           "block K (0-based) = hidden_states[K+1].")
        add_config_args(p, SFTConfig)
        p.set_defaults(func=_command(None if name == "sft" else name))
