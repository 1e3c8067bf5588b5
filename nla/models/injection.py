"""Putting an activation into the AV's forward pass at the marker token (docs/design.md §4).

* ``replace`` (paper default): the embedding *output* at the marker becomes ``v * s / ||v||``.
  Hooking the module's output (not ``inputs_embeds``) keeps Gemma right: its embedding module
  multiplies by ``sqrt(d)`` itself, and we must overwrite the already-scaled value.
* ``add`` (Karvonen): at the output of block ``inject_layer``, ``h += coef * ||h|| * v / ||v||``.

The marker positions are found from the ``input_ids`` the embedding module receives, by marker
id *and* both neighbour ids, so a stray marker character in user text or a tokenizer that merged
the marker with its neighbour is an error instead of a silent mis-injection. Decoding steps of
cached generation see one new token and no marker, and are left untouched: injection happens in
the prefill only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nla import metrics
from nla.errors import NLAError
from nla.models.layers import decoder_blocks

# Rare single-character tokens to try when the tokenizer has no single-token U+3200–U+33FF char.
FALLBACK_MARKERS = ["§", "†", "¬", "µ", "¤", "¶", "‡", "※", "◊", "×", "÷", "•", "→", "~", "^", "`", "|", "$", "@"]


@dataclass(frozen=True)
class MarkerTokens:
    marker: str
    marker_id: int
    left_id: int
    right_id: int

    def to_dict(self) -> dict[str, Any]:
        return {"marker": self.marker, "marker_id": self.marker_id, "left_id": self.left_id, "right_id": self.right_id}


def _single_token(tokenizer: Any, ch: str) -> int | None:
    ids = tokenizer.encode(ch, add_special_tokens=False)
    if len(ids) != 1:
        return None
    if tokenizer.decode(ids) != ch:
        return None
    return int(ids[0])


def find_marker(render_text: Callable[[str], str], encode: Callable[[str], list[int]], tokenizer: Any) -> MarkerTokens:
    """The first usable marker (docs/design.md §4) for a tokenizer and an AV prompt renderer.

    ``render_text(marker)`` gives the full rendered AV prompt (chat template applied) and
    ``encode(text)`` its token ids exactly as the verbalizer will tokenize it. A candidate is
    usable when it is one token on its own, appears exactly once in the encoded prompt, and the
    tokens left and right of it are exactly the tokens of the text before and after it: the
    marker must not merge with, or change the tokenization of, its neighbours.
    """
    candidates = [chr(c) for c in range(0x3200, 0x3400)] + FALLBACK_MARKERS
    special = set(tokenizer.all_special_ids)
    for ch in candidates:
        marker_id = _single_token(tokenizer, ch)
        if marker_id is None or marker_id in special:
            continue
        text = render_text(ch)
        if text.count(ch) != 1:
            continue
        ids = encode(text)
        hits = [i for i, t in enumerate(ids) if t == marker_id]
        if len(hits) != 1 or hits[0] == 0 or hits[0] == len(ids) - 1:
            continue
        p = hits[0]
        before, after = text.split(ch)
        if encode(before) != ids[:p]:
            continue
        if tokenizer.encode(after, add_special_tokens=False) != ids[p + 1 :]:
            continue
        return MarkerTokens(ch, marker_id, int(ids[p - 1]), int(ids[p + 1]))
    raise NLAError("no usable marker token: the tokenizer has no rare single-token character")


def marker_positions(input_ids: torch.Tensor, tokens: MarkerTokens) -> torch.Tensor:
    """``[n, 2]`` (row, position) of every marker whose neighbours match, row-major order."""
    ids = input_ids
    is_marker = ids == tokens.marker_id
    left = torch.zeros_like(is_marker)
    right = torch.zeros_like(is_marker)
    left[:, 1:] = ids[:, :-1] == tokens.left_id
    right[:, :-1] = ids[:, 1:] == tokens.right_id
    return torch.nonzero(is_marker & left & right, as_tuple=False)


class Injector:
    """Forward hooks that inject one vector per marker; use as a context manager.

    ``vectors`` are matched to markers in row-major order; the count must agree. ``set_vectors``
    lets a caller re-arm the same hooks for the next batch (training loops).
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: MarkerTokens,
        vectors: torch.Tensor | None = None,
        *,
        mode: str = "replace",
        scale: float = 1.0,
        inject_layer: int = 1,
        coef: float = 1.0,
    ):
        if mode not in ("replace", "add"):
            raise NLAError(f"injection mode must be 'replace' or 'add', got {mode!r}")
        self.model = model
        self.tokens = tokens
        self.mode = mode
        self.scale = float(scale)
        self.inject_layer = inject_layer
        self.coef = float(coef)
        self.vectors: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._handles: list[Any] = []
        if vectors is not None:
            self.set_vectors(vectors)

    def set_vectors(self, vectors: torch.Tensor) -> None:
        vectors = vectors.detach().float()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        check_vectors(vectors)
        self.vectors = vectors

    # ---------------------------------------------------------------- hooks
    def _embedding_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        input_ids = inputs[0] if inputs else None
        self._positions = None
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or self.vectors is None:
            return None
        pos = marker_positions(input_ids, self.tokens)
        if len(pos) == 0 and input_ids.shape[1] == 1:
            return None  # a cached decoding step: never touched
        if len(pos) != len(self.vectors):
            raise NLAError(
                f"injection: found {len(pos)} marker tokens (id {self.tokens.marker_id} with neighbours "
                f"{self.tokens.left_id}/{self.tokens.right_id}) but got {len(self.vectors)} vectors"
            )
        self._positions = pos
        if self.mode != "replace":
            return None
        v = self.vectors.to(output.device)
        # Norm in fp32: a bf16 norm of a large vector loses the scale the AV was trained on.
        unit = metrics.unit(v)  # any norm, even 1e-30, injects its direction
        out = output.clone()
        out[pos[:, 0], pos[:, 1]] = (unit * self.scale).to(output.dtype)
        return out

    def _block_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        pos = self._positions
        if pos is None or self.vectors is None or len(pos) == 0:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        v = self.vectors.to(hidden.device)
        unit = metrics.unit(v)  # any norm, even 1e-30, injects its direction
        h = hidden[pos[:, 0], pos[:, 1]].float()
        h_norm = torch.sqrt((h * h).sum(-1, keepdim=True) + 1e-12)
        hidden = hidden.clone()
        hidden[pos[:, 0], pos[:, 1]] = (h + self.coef * h_norm * unit).to(hidden.dtype)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    def __enter__(self) -> Injector:
        emb = self.model.get_input_embeddings()  # type: ignore[operator]
        self._handles.append(emb.register_forward_hook(self._embedding_hook))
        if self.mode == "add":
            block = decoder_blocks(self.model)[self.inject_layer]
            self._handles.append(block.register_forward_hook(self._block_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._positions = None


def check_vectors(vectors: torch.Tensor, d_model: int | None = None) -> None:
    """Reject what would inject garbage: wrong width, NaN/inf, all-zero (no direction)."""
    if vectors.ndim != 2:
        raise NLAError(f"expected vectors of shape [n, d], got {tuple(vectors.shape)}")
    if d_model is not None and vectors.shape[1] != d_model:
        raise NLAError(f"vector width {vectors.shape[1]} does not match the model's d_model={d_model}")
    if not torch.isfinite(vectors).all():
        bad = int((~torch.isfinite(vectors)).any(-1).nonzero()[0])
        raise NLAError(f"vector {bad} contains NaN or inf")
    zero = (vectors.abs().sum(-1) == 0).nonzero()
    if len(zero):
        raise NLAError(f"vector {int(zero[0])} is all zeros: it has no direction to inject")
