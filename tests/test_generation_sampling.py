"""Row-seeded sampling: exact draws from the softmax, independent of batching and process split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nla.bundle import NLA, LoraSettings
from nla.train.generation import (
    RowSeededSampler,
    SamplingSettings,
    TransformersBackend,
    top_p_filter,
)


def test_gumbel_argmax_draws_from_the_tempered_softmax() -> None:
    """Frequencies over 6000 independent keys match softmax(logits / T) (within 4 standard errors)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temp = 0.8
    keys = list(range(6000))
    sampler = RowSeededSampler(keys, prompt_len=0, temperature=temp, top_p=1.0)
    picks = sampler(torch.zeros(len(keys), 0, dtype=torch.long), logits.expand(len(keys), -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=6).float() / len(keys)
    p = torch.softmax(logits / temp, -1)
    se = (p * (1 - p) / len(keys)).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-3).all(), (freq, p)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).sum(-1).tolist() == [3, 3]
    # A sampler at top_p never picks a filtered token.
    keys = list(range(500))
    sampler = RowSeededSampler(keys, prompt_len=0, temperature=1.0, top_p=0.8)
    picks = sampler(torch.zeros(500, 0, dtype=torch.long), logits[:1].expand(500, -1)).argmax(-1)
    assert set(picks.tolist()) == {0, 1}


@pytest.fixture(scope="module")
def av(tiny_dataset: Path) -> NLA:
    return NLA.initialize(dataset=str(tiny_dataset), lora=LoraSettings(r=4))


def test_rollouts_do_not_depend_on_batch_size_or_the_split_over_processes(av: NLA) -> None:
    """What a rank generating vectors [2, 3] with offset 2 samples equals rows 2-3 of the whole
    batch generated in one process, at any --gen-batch-size: the property multi-process RL
    relies on to reproduce a one-process run."""
    torch.set_num_threads(1)
    backend = TransformersBackend(av.verbalizer)
    vecs = torch.randn(4, av.meta.d_model, generator=torch.Generator().manual_seed(3))

    def ids(rolls: list) -> list[list[int]]:
        return [r.completion_ids for r in rolls]

    whole = backend.generate(vecs, 3, SamplingSettings(max_new_tokens=6, batch_size=12, top_p=0.9), seed=11)
    small = backend.generate(vecs, 3, SamplingSettings(max_new_tokens=6, batch_size=5, top_p=0.9), seed=11)
    assert ids(whole) == ids(small)
    first = backend.generate(vecs[:2], 3, SamplingSettings(max_new_tokens=6, batch_size=4, top_p=0.9), seed=11)
    second = backend.generate(vecs[2:], 3, SamplingSettings(max_new_tokens=6, batch_size=4, top_p=0.9), seed=11,
                              offset=2)
    assert ids(first) + ids(second) == ids(whole)
    assert [r.vector_index for r in second] == [0, 0, 0, 1, 1, 1]  # local indices, group-major
    # Not trivially equal: the answers of a group differ from one another.
    assert len({tuple(r.completion_ids) for r in whole[:3]}) > 1
