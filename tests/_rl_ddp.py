"""Worker of the multi-process RL test (tests/test_rl.py): one small RL run, then AR steps.

Run in this process for the one-process reference, or under ``accelerate launch`` for two
ranks; both write the same files, so the test compares them. Not a test module itself.

    python tests/_rl_ddp.py BUNDLE DATA OUT [--fail-at N] [--resume]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def letter_e_reward(tokenizer: Any, fail_at_step: int | None = None) -> Any:
    """A dense, learnable reward for an untrained AV: the share of answer tokens containing 'e'."""
    e_ids = {i for i in range(len(tokenizer)) if "e" in tokenizer.decode([i])}

    def reward(vectors: torch.Tensor, explanations: list[str | None], reconstructions: torch.Tensor,
               token_ids: list[list[int]], step: int, **ctx: Any) -> list[float]:
        if fail_at_step is not None and step == fail_at_step:
            raise KeyboardInterrupt  # a kill in the middle of a run (every rank computes rewards)
        return [sum(t in e_ids for t in ids) / max(len(ids), 1) for ids in token_ids]

    return reward


def run(bundle: str, data: str, out: str, fail_at: int | None = None, resume: bool = False) -> None:
    from nla.bundle import NLA
    from nla.train.generation import Rollout
    from nla.train.rl import RLConfig, RLTrainer

    torch.set_num_threads(1)
    tok = NLA.from_pretrained(bundle).tokenizer
    # 5 vectors over 2 ranks: uneven shares (3 + 2); update_batch_size 4 cuts a rank's share.
    cfg = RLConfig(nla=bundle, data=data, out=out, steps=4, batch_size=5, group_size=2, max_new_tokens=6,
                   lr=2e-2, lora_r=4, kl_coef=0.05, update_batch_size=4, invalid_reward=None, train_ar=True,
                   ar_lr=1e-2, eval_rows=0, save_every=2, seed=3, progress=False, device="cpu", resume=resume)
    trainer = RLTrainer(cfg, rewards=[(letter_e_reward(tok, fail_at), 1.0)])
    trainer.train()
    # The AR keep-up step on explanations that parse (an untrained AV writes none): 6 valid
    # rollouts and one invalid, picks of 4 split over the ranks, three steps.
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa", "lambda mu"]
    rolls = [Rollout(i, [1], w, w, True) for i, w in enumerate(words)] + [Rollout(6, [1], "junk", None, False)]
    vecs = trainer.vectors[:7]
    trainer.cfg.ar_batch_size, trainer.cfg.ar_steps = 4, 3
    losses = [trainer._ar_update(rolls, vecs, step) for step in range(2)]
    if trainer.dist.main:
        av = {k: v.detach().clone() for k, v in trainer.nla.av_model.named_parameters() if v.requires_grad}
        ar = {k: v.detach().clone() for k, v in trainer.nla.ar.named_parameters() if v.requires_grad}
        torch.save({"av": av, "ar": ar}, Path(out) / "params.pt")
        (Path(out) / "ar_losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--fail-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    try:
        run(a.bundle, a.data, a.out, a.fail_at, a.resume)
    except KeyboardInterrupt:
        raise SystemExit(3) from None
