"""CPU thread settings on the real stages: one AV SFT step and one AV generation.

Each setting runs in a fresh process (``OMP_WAIT_POLICY`` only counts if it is set before torch
loads its OpenMP runtime), quiet and beside one competing busy process (a single-threaded
matmul loop, what another job on a 2-core box looks like). Prints seconds per SFT step and per
generation and the ratio against torch's plain default (2 threads, threads spin while waiting)
measured in the same run.

    .venv/bin/python benchmarks/threads.py [--rounds 2] [--model default]

``nla`` sets ``OMP_WAIT_POLICY=PASSIVE`` when it is imported (``nla/__init__.py``); the
"default" rows here set ``OMP_WAIT_POLICY=ACTIVE`` explicitly to measure what torch does
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "2 threads, spinning (torch default)": {"OMP_WAIT_POLICY": "ACTIVE", "threads": 2},
    "2 threads, OMP_WAIT_POLICY=PASSIVE (nla default)": {"OMP_WAIT_POLICY": "PASSIVE", "threads": 2},
    "1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "threads": 1},
}


def child(model: str, threads: int, steps: int) -> None:
    import torch

    from nla.bundle import NLA, LoraSettings
    from nla.train.sft import av_labels, pad_right

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nla = NLA.initialize(model, lora=LoraSettings(r=16, alpha=32), device="cpu")
    explanation = '- ends "of the given type"\n- predicts "." then "," or "of"\n- about "literal", "evaluation", "object"'
    examples = [nla.verbalizer.training_example(explanation, None) for _ in range(8)]
    ids, mask = pad_right([e for e, _ in examples], int(nla.tokenizer.pad_token_id or 0))
    labels = av_labels(ids, mask, [n for _, n in examples])
    vectors = torch.randn(8, nla.meta.d_model)
    model_ = nla.av_model
    opt = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=1e-4)
    injector = nla.verbalizer.injector()

    def sft_step() -> None:
        injector.set_vectors(vectors)
        logits = model_(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()

    sft_step()  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for _ in range(steps):
        sft_step()
    sft_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    with torch.no_grad():
        nla.verbalize(vectors, max_new_tokens=32, do_sample=False)
    gen_s = time.perf_counter() - t0
    print(json.dumps({"sft_step_s": sft_s, "generate_s": gen_s}))


def busy() -> subprocess.Popen[bytes]:
    code = ("import numpy as np, os\nos.environ['OMP_NUM_THREADS']='1'\n"
            "a = np.random.rand(400, 400)\nwhile True:\n    a = (a @ a) / 400.0\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def run_setting(name: str, model: str, steps: int) -> dict[str, float]:
    s = SETTINGS[name]
    env = {**os.environ, "OMP_WAIT_POLICY": str(s["OMP_WAIT_POLICY"])}
    out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--threads", str(s["threads"]),
                          "--steps", str(steps)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed SFT steps per process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.threads, args.steps)
        return
    print(f"load average before: {os.getloadavg()}")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for load in ("quiet", "one busy process"):
            proc = busy() if load != "quiet" else None
            try:
                for name in SETTINGS:  # interleaved, so a load change hits every setting alike
                    res = run_setting(name, args.model, args.steps)
                    results.setdefault((load, name), []).append(res)
                    print(f"round {r + 1} {load:16s} {name:50s} sft {res['sft_step_s']:.2f} s/step  "
                          f"generate {res['generate_s']:.2f} s", flush=True)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    print(f"load average after: {os.getloadavg()}")
    print("\n| load | setting | SFT step (median) | × default | generation (median) | × default |")
    print("|---|---|---|---|---|---|")
    for load in ("quiet", "one busy process"):
        base = results[(load, next(iter(SETTINGS)))]
        b_sft = statistics.median(x["sft_step_s"] for x in base)
        b_gen = statistics.median(x["generate_s"] for x in base)
        for name in SETTINGS:
            sft = statistics.median(x["sft_step_s"] for x in results[(load, name)])
            gen = statistics.median(x["generate_s"] for x in results[(load, name)])
            print(f"| {load} | {name} | {sft:.2f} s | {sft / b_sft:.2f} | {gen:.2f} s | {gen / b_gen:.2f} |")


if __name__ == "__main__":
    main()
