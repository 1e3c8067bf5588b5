"""Model forwards that stop at decoder block K (docs/design.md §2).

Extraction, ``NLA.base_states`` and the universal stage all read block K's output this way: a
hook on that block raises, so the later blocks, the final norm and the LM head never run.
"""

from __future__ import annotations

from typing import Any

import torch

from nla.models.layers import decoder_blocks


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class BlockOutput:
    """Run a model up to block K and return that block's output, skipping everything after.

    Used as a context manager around forward calls; works for any architecture because the
    block list is found by structure (:func:`decoder_blocks`).
    """

    def __init__(self, model: torch.nn.Module, layer: int):
        self.model = model
        self.block = decoder_blocks(model)[layer]
        self.handle: Any = None

    def __enter__(self) -> BlockOutput:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            raise _StopForward(hidden)

        self.handle = self.block.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit position ids: with left padding the default positions would be shifted.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _StopForward as stop:
            return stop.hidden
        raise RuntimeError("block hook did not fire")  # pragma: no cover


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def block_states(
    runner: BlockOutput, seqs: list[list[int]], pad_id: int, device: torch.device, side: str = "right"
) -> list[torch.Tensor]:
    """Per-sequence ``[len, d]`` block-K states for a padded batch (padding stripped)."""
    ids, mask = pad_batch(seqs, pad_id, side)
    hidden = runner(ids.to(device), mask.to(device)).float().cpu()
    out = []
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        start = 0 if side == "right" else width - len(s)
        out.append(hidden[i, start : start + len(s)])
    return out

