"""AR adaptation: after SFT, the AR learns to read the AV's own words (docs/design.md §1; docs/training.md).

Warm-started on teacher labels, the AR has only ever read correct explanations. The AV,
reading vectors it never trained on, writes explanations that are partly wrong in its own
systematic ways (a neighbouring word, a frequent topic word, a repeated guess), and the AR takes
each wrong word at face value: a plausible explanation of *another* position sends it
confidently to another vector, which costs more than predicting the mean. The paper's RL fixes
this jointly: its AR keeps training on the AV's samples. This phase does the supervised part of
that once, at SFT cost: the AV explains (greedily) the vectors of rows it never trained on,
and the AR trains on those (explanation → vector) pairs, mixed with teacher labels so it keeps
reading those too.

The AV's answers are generated in chunks and appended to a JSONL cache in the run folder, so a
killed run regenerates only the chunks it lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nla.models.verbalizer import Verbalizer


def answer_text(explanation: str | None, raw: str) -> str:
    """What the AR reads for one AV answer: the parsed explanation, else the raw text.

    The same rule as evaluation's round trip (``nla.eval.suite.answer_text``), so the AR
    adapts to exactly what it will be scored on.
    """
    return explanation if explanation is not None else raw


@torch.no_grad()
def av_explanations(
    verbalizer: Verbalizer,
    vectors: torch.Tensor,
    keys: list[str],
    *,
    cache: Path | None,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> list[str]:
    """The AV's greedy answer for each vector, as the AR reads it; cached chunk by chunk under ``keys``."""
    done: dict[str, str] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: that chunk is generated again
            if item.get("max_new_tokens") == max_new_tokens:
                done[item["key"]] = item["text"]
    was_training = verbalizer.model.training
    verbalizer.model.eval()
    bar = tqdm(total=len(keys), desc="ar_adapt: AV answers", unit="vec", disable=not progress)
    try:
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            if all(k in done for k in chunk):
                bar.update(len(chunk))
                continue
            answers = verbalizer.generate(vectors[start : start + batch_size], n=1, max_new_tokens=max_new_tokens,
                                          do_sample=False, batch_size=batch_size)
            lines = []
            for key, (answer,) in zip(chunk, answers, strict=True):
                done[key] = answer_text(answer.explanation, answer.raw)
                lines.append(json.dumps({"key": key, "text": done[key], "max_new_tokens": max_new_tokens},
                                        ensure_ascii=False))
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a", encoding="utf-8") as fh:
                    fh.write("\n".join(lines) + "\n")
            bar.update(len(chunk))
    finally:
        bar.close()
        verbalizer.model.train(was_training)
    return [done[k] for k in keys]


def mixed_rows(av_rows: list[dict[str, Any]], teacher_rows: list[dict[str, Any]], teacher_fraction: float,
               seed: int) -> list[dict[str, Any]]:
    """All AV rows plus a seeded sample of teacher rows making ``teacher_fraction`` of the result.

    The trainer shuffles rows each epoch, so every batch holds about that mix.
    """
    if not 0 <= teacher_fraction < 1:
        raise ValueError(f"teacher_fraction must be in [0, 1), got {teacher_fraction}")
    n_teacher = min(len(teacher_rows), round(len(av_rows) * teacher_fraction / (1 - teacher_fraction)))
    gen = torch.Generator().manual_seed(seed)
    return av_rows + [teacher_rows[i] for i in torch.randperm(len(teacher_rows), generator=gen)[:n_teacher].tolist()]
