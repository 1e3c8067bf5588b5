"""One forward pass that yields block K's output *and* the model's next-token guesses.

`nla extract --next-tokens N` uses it to store, per row, the base model's top-N next-token ids
and probabilities beside the vector (docs/design.md §3). The ``lens`` teacher reads them from
there instead of running the whole model over every document a second time: on the embedded
default that second pass cost more than extraction itself.

The LM head runs only at the rows' positions: a hook on its input stops the forward before
the full ``[batch, len, vocab]`` logits exist (most of the memory and much of the time with a
49k–262k vocabulary).
"""

from __future__ import annotations

from typing import Any

import torch

from nla.models.layers import decoder_blocks

# Dataset columns written by `nla extract --next-tokens N` (lists of N, most likely first).
NEXT_TOKEN_IDS = "next_token_ids"
NEXT_TOKEN_PROBS = "next_token_probs"


class _FinalHidden(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class BlockAndNextTokens:
    """Context manager: ``runner(ids, mask)`` → (block-K output, final hidden states), both ``[B, T, d]``."""

    def __init__(self, model: torch.nn.Module, layer: int):
        self.model = model
        self.block = decoder_blocks(model)[layer]
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None:
            from nla.errors import NLAError

            raise NLAError("--next-tokens needs a causal LM with an output head; this model has none")
        self.head: torch.nn.Module = head
        # Gemma 2 caps its logits after the head; the cap is monotonic (same top-N) but changes
        # the probabilities, so it is applied here as the model applies it.
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._hidden: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._armed = False

    def __enter__(self) -> BlockAndNextTokens:
        def keep(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._hidden = output[0] if isinstance(output, tuple) else output

        def stop(_module: torch.nn.Module, inputs: Any) -> None:
            if self._armed:  # inside the model's forward; top_tokens calls the head itself
                raise _FinalHidden(inputs[0])

        self._handles = [self.block.register_forward_hook(keep), self.head.register_forward_pre_hook(stop)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self._hidden, self._armed = None, True
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _FinalHidden as final:
            if self._hidden is None:  # pragma: no cover - the block runs before the head
                raise RuntimeError("block hook did not fire") from None
            return self._hidden, final.hidden
        finally:
            self._armed = False
        raise RuntimeError("LM head hook did not fire")  # pragma: no cover

    @torch.no_grad()
    def top_tokens(self, final: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (ids, probabilities) of the next token from final hidden states ``[n, d]``."""
        logits = self.head(final).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        top = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        return top.indices, top.values
