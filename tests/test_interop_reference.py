"""Shared pieces of the interop tests: tiny source models, and the layouts' inference recipes
re-implemented directly (plain transformers calls, no nla code) to compare the importers against.

No tests live here; the ``test_interop_*`` files import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nla.models.loading import resolve_model_path


def tiny_path(arch: str) -> str:
    return resolve_model_path(f"tiny:{arch}")


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Make a fine-tuned-looking copy: an importer that silently loads the base would now differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def random_head(d_in: int, d_out: int, seed: int, bias: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"weight": torch.randn(d_out, d_in, generator=gen) / d_in**0.5}
    if bias:
        out["bias"] = torch.randn(d_out, generator=gen)
    return out


def chat_ids(tok: Any, content: str) -> list[int]:
    """The released recipe: render the chat template to text, then encode without specials."""
    if tok.chat_template:
        rendered = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
        return list(tok(rendered, add_special_tokens=False).input_ids)
    ids = list(tok(f"User: {content}\nAssistant: ", add_special_tokens=True).input_ids)
    return ids


def marker_neighbours(tok: Any, content: str, marker_id: int) -> tuple[int, int, int]:
    ids = chat_ids(tok, content)
    hits = [i for i, t in enumerate(ids) if t == marker_id]
    assert len(hits) == 1, hits
    p = hits[0]
    return p, ids[p - 1], ids[p + 1]


def replace_embeds(model: Any, ids: list[int], position: int, vector: torch.Tensor, scale: float) -> torch.Tensor:
    """Replace injection: the embedding at the marker becomes ``v * s / ||v||``."""
    emb = model.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    v = vector.float()
    emb[0, position] = (v * (scale / v.norm())).to(emb.dtype)
    return emb


def captured_embeddings(nla: Any, ids: list[int], vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What our verbalizer feeds the AV: (embedding output after injection, logits)."""
    seen: list[torch.Tensor] = []
    emb = nla.av_model.get_input_embeddings()
    with torch.no_grad(), nla.verbalizer.injector(vectors):
        handle = emb.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        try:
            logits = nla.av_model(input_ids=torch.tensor([ids])).logits
        finally:
            handle.remove()
    return seen[0], logits


def trunk_readout(trunk: Any, ids: list[int], block: int) -> torch.Tensor:
    """Raw output of decoder block ``block`` at the last token (final norm never applied)."""
    if hasattr(trunk, "norm"):
        trunk.norm = nn.Identity()
    with torch.no_grad():
        out = trunk(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[block + 1][0, -1].float()


def apply_head(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = x @ tensors["weight"].float().T
    if "bias" in tensors:
        y = y + tensors["bias"].float()
    return y

