"""Training infrastructure shared by SFT and RL: logging, schedule, guard, checkpoints, plots.

A run directory looks like::

    RUN/
      nla_meta.yaml, av/, ar/, ...   the final bundle (loadable with NLA.from_pretrained(RUN))
      train_config.yaml              the resolved config
      metrics.jsonl                  one JSON object per logged event: {"step", "phase", ...}
      curves.png                     the curves of metrics.jsonl
      checkpoints/<tag>-<step>/      a complete bundle + trainer_state.{pt,json}

A checkpoint counts only once ``trainer_state.json`` exists: it is written last, so a kill
while saving leaves the previous checkpoint as the latest. Resuming truncates
``metrics.jsonl`` to the checkpoint's step, so the resumed curve has no duplicates.

Data order is not an RNG state to restore: trainers derive the whole order of every epoch
from the seed up front, and the checkpoint records the position in it (``TrainerState.step``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.names import write_json_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


# ---------------------------------------------------------------- logging
def check_logging_backends(tensorboard: bool = False, wandb: bool = False) -> None:
    """One-line error for an asked-for sink whose package is missing (before any work is done)."""
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise NLAError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
    if wandb:
        try:
            import wandb as wandb_module  # noqa: F401
        except ImportError:
            raise NLAError("--wandb: the wandb package is not installed (pip install wandb)") from None


class MetricsLogger:
    """Append-only JSONL metrics, mirrored to TensorBoard / W&B when installed and asked for.

    ``jsonl=False`` mirrors only (``nla eval`` writes its own metrics.json). The same three
    flags (``--tensorboard``, ``--wandb``, ``--wandb-project``) drive SFT, RL and eval.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "nla", run_name: str | None = None, enabled: bool = True,
                 jsonl: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled  # False on non-main processes under accelerate
        self.jsonl = jsonl
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_logging_backends(tensorboard, wandb)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            # The API key comes from the environment (WANDB_API_KEY); it is never written here.
            self._wandb = wandb_module.init(project=wandb_project, name=run_name or Path(run_dir).name,
                                            dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int, phase: str | None = None) -> None:
        """Drop records past ``step`` (of ``phase``): a resumed run re-logs them."""
        if not self.enabled or not self.jsonl or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path)
                if not ((phase is None or r.get("phase") == phase) and r.get("step", 0) > step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, Any], phase: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        if self.jsonl:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        numeric = {f"{phase}/{k}": v for k, v in record.items()
                   if k not in ("step", "time", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def flatten_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1.0}}`` → ``{"a/b": 1.0}``: the numbers of a nested report, for the mirrors."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the fact visible
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a half-written last line (kill mid-write) is ignored."""
    out: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Progress:
    """A tqdm bar showing loss, tokens/s and (tqdm's own) ETA; silent when disabled."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int, **postfix: Any) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
        self.bar.set_postfix(tok_s=f"{rate:,.0f}", **shown)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------- schedule and guard
def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base lr, then cosine decay to ``min_ratio`` × base lr."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """False if any gradient holds NaN/inf: stepping on it would poison the weights for good."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)


def guarded_step(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
                 max_grad_norm: float | None = None, *,
                 agree: Callable[[bool], bool] | None = None,
                 clip: Callable[[float], torch.Tensor] | None = None) -> tuple[bool, float]:
    """Clip and step, or skip the step when a gradient is NaN/inf. Returns (stepped, grad_norm).

    The gradients are always cleared, so a skipped step does not leak into the next one.
    Sharded training (FSDP) sees only its own shard of each gradient: ``agree`` turns the local
    verdict into the global one (all processes must skip together, or their weights diverge) and
    ``clip`` computes the norm over the whole model instead of over the local shard.
    """
    finite = grads_finite(parameters)
    if agree is not None:
        finite = agree(finite)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return False, float("nan")
    limit = max_grad_norm if max_grad_norm else float("inf")
    norm = clip(limit) if clip is not None else torch.nn.utils.clip_grad_norm_(parameters, limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True, float(norm)


# ---------------------------------------------------------------- checkpoints
@dataclass
class TrainerState:
    """Where a run is: ``step`` optimizer steps done of ``total_steps`` in ``phase``."""

    phase: str
    step: int = 0
    total_steps: int = 0
    done: bool = False
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: str | Path, phase: str, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{phase}-{step:07d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: str | Path, nla: Any, state: TrainerState,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, keep: int | None = 2,
                    extra: dict[str, Any] | None = None,
                    write_weights: Callable[[Path], None] | None = None) -> Path:
    """Bundle + trainer state under ``checkpoints/<phase>-<step>``; older ones pruned to ``keep``.

    ``extra``: more tensors/state dicts to keep with it (RL: the AR optimizer, the RL adapter),
    read back with :func:`checkpoint_extra`. ``write_weights(path)`` rewrites model weights in
    the saved bundle before the checkpoint is marked complete (FSDP: the live modules hold only
    this process's shard, the full weights come from a gathered state dict).
    """
    path = checkpoint_dir(run_dir, state.phase, state.step)
    nla.save_pretrained(path)
    if write_weights is not None:
        write_weights(path)
    blob: dict[str, Any] = {"rng": rng_state()}
    if extra is not None:
        blob["extra"] = extra
    if optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        blob["scheduler"] = scheduler.state_dict()
    torch.save(blob, path / STATE_PT)
    # Written last: its presence is what makes this a checkpoint.
    write_json_atomic(path / STATE_JSON, asdict(state))
    if keep is not None:
        prune_checkpoints(run_dir, state.phase, keep)
    return path


def prune_checkpoints(run_dir: str | Path, phase: str, keep: int) -> None:
    found = list_checkpoints(run_dir, phase)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path, phase: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not (p / STATE_JSON).exists() or p.name.endswith((".tmp", ".old")):
            continue
        name, _, step = p.name.rpartition("-")
        if phase is not None and name != phase:
            continue
        if step.isdigit():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path, phase: str | None = None) -> Path | None:
    found = list_checkpoints(run_dir, phase)
    return found[-1] if found else None


def load_trainer_state(path: str | Path) -> TrainerState:
    data = json.loads((Path(path) / STATE_JSON).read_text(encoding="utf-8"))
    return TrainerState(**data)


def restore_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None) -> TrainerState:
    """Optimizer, scheduler and RNG state from a checkpoint (the bundle is loaded by the caller)."""
    path = Path(path)
    try:
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NLAError(f"{path / STATE_PT}: cannot read trainer state ({str(exc).splitlines()[0]})") from None
    if optimizer is not None and "optimizer" in blob:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and "scheduler" in blob:
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return load_trainer_state(path)


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` dict a checkpoint was saved with (empty if none)."""
    path = Path(path)
    try:
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NLAError(f"{path / STATE_PT}: cannot read trainer state ({str(exc).splitlines()[0]})") from None
    return dict(blob.get("extra") or {})


def publish_bundle(nla: Any, run_dir: str | Path) -> None:
    """Write the bundle's files into ``run_dir`` itself, next to logs and checkpoints.

    ``save_pretrained`` swaps whole folders, which would take the logs with it; so the bundle
    is written to a side folder and its entries moved in one by one.
    """
    run = Path(run_dir)
    side = run / ".bundle.tmp"
    shutil.rmtree(side, ignore_errors=True)
    nla.save_pretrained(side)
    for entry in side.iterdir():
        target = run / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    side.rmdir()


# ---------------------------------------------------------------- plots
def plot_metrics(metrics_path: str | Path, out_png: str | Path,
                 keys: list[str] | None = None) -> Path | None:
    """One panel per numeric metric (x = step, one line per phase); None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in records:
        for k, v in r.items():
            if k in ("step", "time", "phase") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if keys is not None and k not in keys:
                continue
            xs, ys = series.setdefault(k, {}).setdefault(r.get("phase", ""), ([], []))
            xs.append(r["step"])
            ys.append(float(v))
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for phase, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=phase)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series[name]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- processes
class Distributed:
    """The process group of an ``accelerate launch`` (torchrun) run; one process otherwise.

    Trainers that split a batch themselves (RL: each rank generates its share) use it for the
    few collectives they need: gathering Python objects, summing gradients (DDP's all-reduce,
    done by hand so PEFT's adapter switching and the injection hooks work unchanged), agreeing
    on a verdict, and running a step on the main process with its error raised on every rank
    (a rank left waiting on a collective would hang instead of failing).
    """

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device: str | None = device
        if self.world > 1:
            from accelerate import PartialState

            # gloo for CPU processes, NCCL for GPUs: accelerate picks the backend from `cpu`.
            state = PartialState(cpu=device == "cpu")
            self.world, self.rank = state.num_processes, state.process_index
            if device != "cpu":
                self.device = str(state.device)  # cuda:<local rank>, not every rank on cuda:0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of ``n`` items (ranks in order)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
        return t

    def sum_floats(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        return self._reduce(t, "sum").tolist()

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        return bool(self._reduce(torch.tensor([int(flag)], device=self._comm_device()), "min").item())

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every rank's gradients in place (a parameter without a gradient counts as zero)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._reduce(p.grad, "sum")

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's values everywhere (a freshly initialised adapter is random per process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process; its result (picklable) is returned on every rank and
        its NLAError raised on every rank. The other ranks wait for it: a barrier too."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        if self.main:
            try:
                result = fn()
            except NLAError as exc:
                error = str(exc)
        box = [error, result]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise NLAError(box[0])
        return box[1]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device(self.device) if dist.get_backend() == "nccl" and self.device else torch.device("cpu")
