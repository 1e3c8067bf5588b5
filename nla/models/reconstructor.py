"""The activation reconstructor (AR): explanation in, vector out (docs/design.md §5).

The base model cut after block K (``num_hidden_layers = K + 1``), with its final norm removed
so the read-out is the raw block-K residual stream, plus a bias-free ``Linear(d, d)`` value
head initialised to the identity and kept in fp32. A fresh AR therefore returns exactly the
block-K state at the last token of its input, the state the AV's vectors come from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.models.layers import hidden_size, truncate_config


def drop_final_norm(trunk: nn.Module) -> None:
    """Replace the trunk's final norm (a direct child whose class is a norm) with Identity."""
    for name, child in list(trunk.named_children()):
        if "norm" in type(child).__name__.lower() or name in ("ln_f", "norm", "final_layernorm"):
            setattr(trunk, name, nn.Identity())


def truncated_config(path: str, layer: int, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return truncate_config(config, layer)


def load_trunk(path: str, layer: int | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Blocks 0..K of a model; only those weights are ever loaded (``layer=None``: as saved)."""
    import logging

    from transformers import AutoModel

    from nla.models.loading import quiet_local_load

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if layer is not None:
        kwargs["config"] = truncated_config(path, layer, trust_remote_code)
    # The weights of blocks > K and of the LM head are expected to be left out: silence the
    # loader's "unused weights" report rather than alarm users with it.
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with quiet_local_load(path):
            trunk = AutoModel.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise NLAError(f"cannot load the reconstructor trunk from {path!r}: {str(exc).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)
    drop_final_norm(trunk)
    return trunk


def identity_head(d_model: int) -> nn.Linear:
    head = nn.Linear(d_model, d_model, bias=False, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d_model))
    return head


class Reconstructor(nn.Module):
    """Trunk + value head. ``forward`` returns fp32 predictions ``[batch, d]``."""

    def __init__(self, trunk: nn.Module, tokenizer: Any, template: str, max_length: int | None = None):
        super().__init__()
        self.trunk = trunk
        self.tokenizer = tokenizer
        self.template = template
        # None (the default, and what inference uses): the whole explanation is read, as the
        # paper's critic does (nla_inference.py NLACritic.reconstruct never cuts). Training sets
        # a number to bound memory, and then the middle is cut (see token_ids).
        self.max_length = max_length
        # Publishers differ here: the paper's critic tokenizes with special tokens (BOS on
        # Gemma/Llama), some importers record False (docs/interop.md).
        self.add_special_tokens = True
        self.d_model = hidden_size(trunk.config)
        self.value_head = identity_head(self.d_model)
        self._n_tail: int | None = None

    def format(self, explanation: str) -> str:
        return self.template.replace("{explanation}", explanation)

    def _tail_tokens(self) -> int:
        """How many tokens the template puts after the explanation (the read-out sits there)."""
        if self._n_tail is None:
            tail = self.template.split("{explanation}", 1)[1] if "{explanation}" in self.template else ""
            self._n_tail = len(self.tokenizer.encode(tail, add_special_tokens=False)) + 1
        return self._n_tail

    def position_limit(self) -> int | None:
        """The trunk's hard input length: learned absolute positions (GPT-2's ``n_positions``).

        Rotary models have no hard limit (``max_position_embeddings`` is a training length,
        not a table size), so they read any length, as the source models do.
        """
        limit = getattr(getattr(self.trunk, "config", None), "n_positions", None)
        return int(limit) if isinstance(limit, int) else None

    def token_ids(self, text: str) -> list[int]:
        """Token ids of one templated explanation: all of them unless ``max_length`` is set.

        With ``max_length`` (training), a long explanation is cut in its middle, not at the
        end: cutting the end would drop the template's closing words, and the AR would read
        its vector at a token it never saw during training. Without it, an input longer than
        the trunk's hard position limit is an error naming the limit, never a silent cut.
        """
        ids = list(self.tokenizer.encode(self.format(text), add_special_tokens=self.add_special_tokens))
        if self.max_length is None:
            limit = self.position_limit()
            if limit is not None and len(ids) > limit:
                raise NLAError(f"reconstruct: the templated explanation is {len(ids)} tokens, over the AR's "
                               f"limit of {limit} positions (n_positions); shorten the explanation")
            return ids
        if len(ids) > self.max_length:
            keep_tail = min(self._tail_tokens(), self.max_length // 2)
            ids = ids[: self.max_length - keep_tail] + ids[-keep_tail:]
        return ids

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` for a batch of explanations."""
        if not texts:
            raise NLAError("reconstruct: no texts given")
        batch = [self.token_ids(t) for t in texts]
        width = max(len(b) for b in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        return ids, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        # Last non-padding token, whichever side the padding is on.
        cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * cols).argmax(-1)
        read = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        # The head stays fp32 even under bf16 autocast (mixed-precision training): a bf16
        # d×d identity product would round away the small corrections the head learns.
        with torch.autocast(device_type=read.device.type, enabled=False):
            return self.value_head(read)

    @torch.no_grad()
    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        device = self.value_head.weight.device
        outs = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = self.encode([texts[i] for i in idx])
            outs.append((idx, self(ids.to(device), mask.to(device)).cpu()))
        result = torch.zeros((len(texts), self.d_model))
        for idx, pred in outs:
            result[idx] = pred
        return result
