"""Helpers of the multi-process RL test (tests/test_rl.py); not a test module itself.

* ``letter_e``: a dense, learnable reward for an untrained AV (the share of answer tokens
  containing 'e'), given to ``nla train rl --reward _rl_ddp:letter_e``; with
  ``NLA_TEST_FAIL_AT=N`` it raises KeyboardInterrupt at step N on every rank (a kill mid-run).
* ``python tests/_rl_ddp.py BUNDLE DATA OUT [-- NLA ARGS...]``: first ``nla NLA ARGS`` (the CLI's
  own ``main``, as ``-m nla.cli`` runs it) when given, then the AR keep-up step on explanations
  that parse (an untrained AV writes none, so a CLI run never trains the AR), in one process or
  under ``accelerate launch`` (one launch for both saves a start-up of two processes); writes
  the AR weights and losses for the test to compare.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def _e_ids() -> frozenset[int]:
    from nla.models.loading import load_tokenizer

    tok = load_tokenizer("tiny:llama")  # the tokenizer of the test's warm-start bundle
    return frozenset(i for i in range(len(tok)) if "e" in tok.decode([i]))


def letter_e(vectors: torch.Tensor, explanations: list[str | None], reconstructions: torch.Tensor,
             token_ids: list[list[int]], step: int, **ctx: Any) -> list[float]:
    fail_at = os.environ.get("NLA_TEST_FAIL_AT")
    if fail_at is not None and step == int(fail_at):
        raise KeyboardInterrupt  # every rank computes the rewards of the gathered batch
    e_ids = _e_ids()
    return [sum(t in e_ids for t in ids) / max(len(ids), 1) for ids in token_ids]


def ar_check(bundle: str, data: str, out: str) -> None:
    from nla.train.generation import Rollout
    from nla.train.rl import RLConfig, RLTrainer

    torch.set_num_threads(1)
    cfg = RLConfig(nla=bundle, data=data, out=out, steps=1, lora_r=4, train_ar=True, ar_lr=1e-2, ar_batch_size=4,
                   ar_steps=3, eval_rows=0, seed=3, progress=False, device="cpu", reward=["neg_mse"])
    trainer = RLTrainer(cfg)
    # 6 valid rollouts and one invalid; picks of 4 split over the ranks (2 + 2), three steps.
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa", "lambda mu"]
    rolls = [Rollout(i, [1], w, w, True) for i, w in enumerate(words)] + [Rollout(6, [1], "junk", None, False)]
    losses = [trainer._ar_update(rolls, trainer.vectors[:7], step) for step in range(2)]
    if trainer.dist.main:
        Path(out).mkdir(parents=True, exist_ok=True)
        ar = {k: v.detach().clone() for k, v in trainer.nla.ar.named_parameters() if v.requires_grad}
        torch.save(ar, Path(out) / "ar_params.pt")
        (Path(out) / "ar_losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--" in args:
        from nla.cli import main

        cut = args.index("--")
        args, cli_args = args[:cut], args[cut + 1 :]
        if main(cli_args) != 0:
            raise SystemExit(1)
    ar_check(*args[:3])
