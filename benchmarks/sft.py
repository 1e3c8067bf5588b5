"""AV SFT throughput vs TRL's SFTTrainer, and AR memory vs a full-depth model.

    .venv/bin/pip install trl==1.16.0     # benchmark only; pulls datasets/pandas, not torch
    .venv/bin/python benchmarks/sft.py [--model tiny:llama|default] [--steps 12] [--batch-size 8]

Both trainers get the same model (a fresh bundle), the same labelled rows in the same
micro-batch size, the same LoRA config, fp32, no gradient accumulation, and the same injection
hook (each batch's vectors are set on the Injector before the forward). Throughput counts
non-padding tokens per second of optimizer steps, skipping the first (warm-up) step.

The memory part compares parameter memory of the AR (blocks 0..K + embeddings + value head)
with the full model, against the bound (K+1)/n_layers × full + head.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def labelled_dataset(model: str, out: Path, docs: int) -> Path:
    from nla.data.extract import ExtractConfig, extract
    from nla.data.store import ActivationDataset

    extract(ExtractConfig(out=str(out), model=model, docs=docs, positions_per_doc=4, min_position=8, seq_len=96,
                          device="cpu", split="av_sft=0.8,ar_sft=0.1,eval=0.1"))
    ds = ActivationDataset.open(out)
    for shard, table in ds.iter_shards():
        expl = [" ".join(c.split()[-6:]) for c in table.column("context").to_pylist()]
        i = table.column_names.index("explanation")
        ds.replace_shard(shard, table.set_column(i, "explanation", pa.array(expl, pa.string())))
    return out


def ours(data: Path, run: Path, steps: int, batch_size: int) -> float:
    from nla.train.loop import read_metrics
    from nla.train.sft import SFTConfig, train_sft

    cfg = SFTConfig(data=str(data), out=str(run), device="cpu", progress=False, batch_size=batch_size,
                    max_steps=steps, eval_every=0, save_every=0, eval_rows=0, lr=1e-4, warmup_ratio=0.0)
    train_sft(cfg, ["av"])
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "av"][1:]
    return sum(r["tokens"] for r in recs) / sum(r["step_s"] for r in recs)


def trl_run(data: Path, run: Path, steps: int, batch_size: int) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from nla.bundle import NLA, LoraSettings
    from nla.data.store import ActivationDataset
    from nla.train.sft import labelled

    torch.manual_seed(0)
    nla = NLA.initialize(dataset=data, lora=LoraSettings(), device="cpu")
    ds = ActivationDataset.open(data)
    rows, vectors = labelled(ds.rows("av_sft"), ds.vectors("av_sft"))
    records = []
    for i, r in enumerate(rows):
        ids, n_prompt = nla.verbalizer.training_example(r["explanation"])
        records.append({"input_ids": ids[:256], "labels": ([-100] * n_prompt + ids[n_prompt:])[:256], "row": i})
    injector = nla.verbalizer.injector()
    base = DataCollatorForLanguageModeling(pad_token_id=nla.tokenizer.pad_token_id)
    counted: list[int] = []

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        # The injection hook needs each batch's vectors, in the batch's row order.
        injector.set_vectors(vectors[[e["row"] for e in examples]])
        counted.append(sum(len(e["input_ids"]) for e in examples))
        return base([{k: v for k, v in e.items() if k != "row"} for e in examples])

    times: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times[-1] = time.perf_counter() - times[-1]

    args = TRLConfig(output_dir=str(run), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=1e-4, lr_scheduler_type="cosine", logging_steps=1000, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, remove_unused_columns=False, dataloader_num_workers=0,
                     max_length=256, packing=False, warmup_steps=0)
    trainer = SFTTrainer(model=nla.av_model, args=args, train_dataset=Dataset.from_list(records),
                         data_collator=collate, processing_class=nla.tokenizer)
    trainer.add_callback(Clock())
    with injector:
        trainer.train()
    # Skip the first (warm-up) step; the collator runs one batch ahead, so pair counts by index.
    return sum(counted[1:steps]) / sum(times[1:steps])


def _resident_bytes() -> int:
    import gc

    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (the memory measurement needs Linux)")


def resident_after_load(model: str, what: str) -> None:
    """Child process: load ``what`` and print its resident memory in bytes."""
    from nla.bundle import NLA, LoraSettings
    from nla.models.loading import canonical_spec, load_model

    torch.set_num_threads(1)
    # Forward passes touch every weight: a lazily mapped checkpoint is not resident until used.
    with torch.no_grad():
        if what == "av":
            av, tokenizer = load_model(canonical_spec(model), device="cpu")
            av(torch.tensor([tokenizer.encode("a short text")]))
        else:
            nla = NLA.initialize(model, lora=LoraSettings(r=16), device="cpu")
            if what == "nla-unshared":
                nla.unshare_frozen_base()
            nla.av_model(torch.tensor([nla.tokenizer.encode("a short text")]))
            nla.reconstruct(["a short text"])
    print(_resident_bytes())


def _measure_in_child(model: str, what: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--model", model, "--resident", what],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def ar_memory(model: str) -> None:
    """Parameter memory of the AR, standalone and inside a LoRA bundle, and resident memory."""
    from nla.bundle import NLA, LoraSettings
    from nla.models.sharing import unique_parameter_bytes

    nla = NLA.initialize(model, lora=LoraSettings(r=16), device="cpu")
    av = _unwrap_peft(nla.av_model)
    full = unique_parameter_bytes(av) - _lora_bytes(nla.av_model)
    head = sum(p.numel() * p.element_size() for p in nla.ar.value_head.parameters())
    k, n = nla.meta.layer_index, nla.meta.n_layers
    bound = (k + 1) / n * full + head
    with_av = unique_parameter_bytes(nla.av_model, nla.ar) - unique_parameter_bytes(nla.av_model)
    nla.unshare_frozen_base()
    standalone = unique_parameter_bytes(nla.ar) - _lora_bytes(nla.ar.trunk)
    emb = sum(p.numel() * p.element_size() for p in av.get_input_embeddings().parameters())
    mib = 2**20
    print(f"model {model}: K = {k} of {n} blocks, base parameters {full / mib:.1f} MiB "
          f"(input embedding {emb / mib:.1f} MiB), value head {head / mib:.2f} MiB; "
          f"bound (K+1)/n_layers x base + head = {bound / mib:.1f} MiB ({bound / full:.3f})")
    print(f"  standalone AR (blocks 0..K + embedding + head): {standalone / mib:.1f} MiB = "
          f"{standalone / full:.3f} of the base -> {'within' if standalone <= bound else 'over'} the bound")
    print(f"  AR inside a LoRA r=16 bundle, beyond the AV (frozen base shared): {with_av / mib:.2f} MiB = "
          f"{with_av / full:.3f} of the base -> {'within' if with_av <= bound else 'over'} the bound")
    rss = {what: _measure_in_child(model, what) for what in ("av", "nla", "nla-unshared")}
    print(f"  resident memory after load and one forward pass: AV alone {rss['av'] / mib:.0f} MiB, LoRA bundle "
          f"{rss['nla'] / mib:.0f} MiB (AR adds {(rss['nla'] - rss['av']) / mib:.0f} MiB), unshared "
          f"{rss['nla-unshared'] / mib:.0f} MiB (AR adds {(rss['nla-unshared'] - rss['av']) / mib:.0f} MiB)")


def _unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--data", default=None, help="labelled dataset (default: extract a small one)")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--memory-only", action="store_true", help="only the AR memory part (no TRL needed)")
    ap.add_argument("--resident", choices=("av", "nla", "nla-unshared"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.resident:
        resident_after_load(args.model, args.resident)
        return
    if args.memory_only:
        ar_memory(args.model)
        return
    try:
        import trl
    except ImportError:
        print("benchmarks/sft.py needs TRL for the baseline: .venv/bin/pip install trl==1.16.0", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tmp = Path(tempfile.mkdtemp(prefix="nla-bench-sft-"))
    try:
        data = Path(args.data) if args.data else labelled_dataset(args.model, tmp / "data", args.docs)
        ours_tps = ours(data, tmp / "ours", args.steps, args.batch_size)
        trl_tps = trl_run(data, tmp / "trl", args.steps, args.batch_size)
        print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, LoRA r=16 all-linear, fp32, "
              f"torch threads {torch.get_num_threads()}, trl {trl.__version__}")
        print(f"AV SFT tokens/s: nla {ours_tps:,.0f}  TRL SFTTrainer {trl_tps:,.0f}  ratio {ours_tps / trl_tps:.2f}x")
        ar_memory(args.model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
