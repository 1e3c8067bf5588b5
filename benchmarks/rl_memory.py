"""Peak memory of the RL log-prob pass: the naive full-vocabulary computation vs the lean one.

A tiny llama-architecture model with a realistic 151 936-token vocabulary (Qwen's) scores
``--batch`` answers of ``--answer`` tokens after a ``--prompt``-token prompt, forward and
backward, the way one policy-update micro-batch of ``nla train rl`` does:

* ``naive``: logits at every position, upcast to fp32, ``log_softmax`` over the vocabulary
  (what RL did before; :func:`nla.train.rl.naive_completion_logprobs`);
* ``lean``: logits only at the answer positions (``logits_to_keep``), fp32 log-softmax in
  checkpointed chunks (:func:`nla.train.rl.completion_logprobs`).

Each variant runs in a fresh child process; the figure is the child's peak resident memory
(``getrusage`` high-water mark) above its resident memory just before the pass, so the model
and the interpreter are not counted. The head is what scales with the vocabulary; the decoder
layers are tiny on purpose, so the difference is the log-prob pass itself.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_memory.py [--batch 8] [--prompt 40] [--answer 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB = 151_936


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(variant: str, batch: int, prompt_len: int, answer: int, vocab: int, dtype: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nla.models.injection import Injector, MarkerTokens
    from nla.train.rl import completion_logprobs, naive_completion_logprobs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).train()
    inj = Injector(model, MarkerTokens("x", 0, 0, 0))  # hooks not entered: scoring only
    prompt = list(range(1, prompt_len + 1))
    gen = torch.Generator().manual_seed(1)
    comps = [torch.randint(0, vocab, (answer - (r % 3),), generator=gen).tolist() for r in range(batch)]
    vecs = torch.ones(batch, 64)
    fn = naive_completion_logprobs if variant == "naive" else completion_logprobs
    before = _rss_bytes()
    if variant == "naive":
        logp = fn(model, inj, prompt, comps, vecs, 1.0, 0)
        mask = (torch.arange(answer)[None] < torch.tensor([[len(c)] for c in comps])).float()
    else:
        logp, mask = fn(model, inj, prompt, comps, vecs, 1.0, 0)
    (logp * mask).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is the process's high-water mark; loading a 2-layer model peaks far below the pass.
    return {"peak_over_start_mib": (peak - before) / 2**20, "logp_sum": float((logp * mask).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="answers per micro-batch (RL --update-batch-size)")
    ap.add_argument("--prompt", type=int, default=40, help="prompt tokens")
    ap.add_argument("--answer", type=int, default=64, help="answer tokens (RL --max-new-tokens)")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", choices=["naive", "lean"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.batch, args.prompt, args.answer, args.vocab, args.dtype)))
        return
    full_fp32 = args.batch * (args.prompt + args.answer) * args.vocab * 4 / 2**20
    print(f"vocab {args.vocab}, batch {args.batch}, prompt {args.prompt} + answer {args.answer} tokens, "
          f"model dtype {args.dtype}; one fp32 [batch, seq, vocab] tensor = {full_fp32:,.0f} MiB")
    results = {}
    for variant in ("naive", "lean"):
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--prompt", str(args.prompt),
               "--answer", str(args.answer), "--vocab", str(args.vocab), "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        print(f"{variant:>5}: peak memory of forward+backward {results[variant]['peak_over_start_mib']:,.0f} MiB "
              f"above the loaded model")
    n, lean = results["naive"]["peak_over_start_mib"], results["lean"]["peak_over_start_mib"]
    print(f"lean / naive = {lean / max(n, 1e-9):.2f}  (same log-probs: "
          f"{abs(results['naive']['logp_sum'] - results['lean']['logp_sum']) < 1e-2 * abs(results['naive']['logp_sum'])})")


if __name__ == "__main__":
    main()
