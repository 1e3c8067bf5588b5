"""The AR-adaptation lever, measured on the `rl` split (docs/benchmarks.md, "How the default was chosen").

Reads the AV's greedy answers for `rl` rows from an `nla eval --split rl` report (its
samples.jsonl), holds out whole documents (about ``--hold`` rows), trains the bundle's AR on the
others' (answer → vector) pairs mixed half and half with `ar_sft` teacher labels, as
`nla train sft --ar-adapt-steps` does, and prints the held-out round trip, retrieval, shuffled gap
and the AR on teacher labels before and after, beside the mean-direction baseline::

    nla eval --nla runs/default/sft --data runs/default/data --split rl --max-rows 768 --best-of 0 \\
        --no-probes --no-causal --max-new-tokens 72 --out out/rl_answers
    python benchmarks/ar_adapt_lever.py runs/default/sft runs/default/data out/rl_answers --steps 150 --lr 2e-4
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from nla import metrics
from nla.bundle import NLA
from nla.data.store import ActivationDataset
from nla.train.adapt import mixed_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("data")
    ap.add_argument("report", help="an `nla eval --split rl` report folder (samples.jsonl)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--head-ratio", type=float, default=2.5, help="value-head lr / trunk lr (the default's 5e-3 / 2e-3)")
    ap.add_argument("--teacher-fraction", type=float, default=0.5)
    ap.add_argument("--hold", type=int, default=256, help="about this many held-out rows (whole documents)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)

    ds = ActivationDataset.open(args.data)
    rows = {f"{r['doc_id']}\x00{r['position']}": (r, v) for r, v in zip(ds.rows("rl"), ds.vectors("rl"), strict=True)}
    answers = [json.loads(line) for line in (Path(args.report) / "samples.jsonl").read_text().splitlines()]
    keys = [f"{a['doc_id']}\x00{a['position']}" for a in answers]
    said = {k: a["av_explanation"] if a["av_explanation"] is not None else a["av_raw"] for k, a in zip(keys, answers, strict=True)}
    docs = sorted({k.split("\x00")[0] for k in keys})
    random.shuffle(docs)
    held_docs: set[str] = set()
    for doc in docs:
        if sum(k.split("\x00")[0] in held_docs for k in keys) >= args.hold:
            break
        held_docs.add(doc)
    held = [k for k in keys if k.split("\x00")[0] in held_docs]
    train = [k for k in keys if k.split("\x00")[0] not in held_docs]
    teacher = [{"explanation": r["explanation"], "vector": v} for r, v in zip(ds.rows("ar_sft"), ds.vectors("ar_sft"), strict=True)
               if r["explanation"]]
    av = [{"explanation": said[k], "vector": rows[k][1]} for k in train]
    mix = mixed_rows(av, teacher, args.teacher_fraction, seed=0)
    print(f"{len(train)} AV answers to adapt on (+{len(mix) - len(av)} teacher rows), {len(held)} held out")

    nla = NLA.from_pretrained(args.bundle, is_trainable=True, device="cpu")
    ar, mean = nla.ar, nla.mean_vector
    assert mean is not None
    target = torch.stack([torch.as_tensor(rows[k][1]) for k in held]).float()
    b = metrics.baseline_variance(target, mean)

    def report(tag: str) -> None:
        ar.eval()
        pred = ar.reconstruct([said[k] for k in held])
        alone = ar.reconstruct([rows[k][0]["explanation"] for k in held])
        base = metrics.fve_nrm(mean.expand_as(target), target, mean, b)
        print(f"{tag}: round trip fve_nrm {metrics.fve_nrm(pred, target, mean, b):.3f} (mean direction {base:.3f}), "
              f"top-1 {metrics.top1_retrieval(pred, target):.3f}, gap {metrics.shuffled_gap(pred, target):.3f}; "
              f"AR on teacher labels {metrics.fve_nrm(alone, target, mean, b):.3f}", flush=True)

    report("before")
    head = list(ar.value_head.parameters())
    trunk = [p for p in ar.parameters() if p.requires_grad and all(p is not h for h in head)]
    opt = torch.optim.AdamW([{"params": trunk, "lr": args.lr}, {"params": head, "lr": args.lr * args.head_ratio}],
                            weight_decay=0.0)
    warm = max(1, round(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / args.steps))
    started = time.perf_counter()
    for _ in range(args.steps):
        ar.train()
        batch = random.sample(mix, args.batch_size)
        ids, mask = ar.encode([r["explanation"] for r in batch])
        loss = metrics.mse_nrm(ar(ids, mask), torch.stack([torch.as_tensor(r["vector"]) for r in batch]).float()).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trunk + head, 1.0)
        opt.step()
        sched.step()
    print(f"{args.steps} steps in {time.perf_counter() - started:.0f} s")
    report(f"after (lr {args.lr}, teacher fraction {args.teacher_fraction})")


if __name__ == "__main__":
    main()
