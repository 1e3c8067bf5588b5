"""One copy of the frozen base weights for the AV and the AR trunk.

With LoRA, the AV and the AR are the same frozen base model plus different adapters, and the
AR trunk is blocks 0..K of it: its embedding table and every block it keeps are, weight for
weight, already in the AV. Holding them once is what makes the AR cost only its adapter and
value head beyond the AV, tied embeddings included (a standalone AR of a tied-embedding
model must keep the whole table, which a (K+1)/n_layers share of the model cannot pay for).

Only parameters that are frozen on both sides and equal to the last bit are shared, so a
shared bundle computes exactly what an unshared one does. Anything that will change base
weights in place (merging an adapter, full fine-tuning, FSDP flattening) must call
:func:`unshare` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class SharedParameter:
    owner: nn.Module  # the trunk module whose attribute now points at the AV's parameter
    name: str


def _body(model: Any) -> nn.Module:
    """The transformer body (embeddings + blocks) under PEFT and LM-head wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "base_model", inner)
    return body if isinstance(body, nn.Module) else inner


def _plain_name(name: str) -> str:
    # PEFT moves an adapted layer's weight under ``base_layer``; the AV and the AR may adapt
    # different modules, so compare names without it.
    return name.replace(".base_layer", "")


def share_frozen_base(av_model: Any, trunk: Any) -> list[SharedParameter]:
    """Point the trunk's frozen base parameters at the AV's equal ones; returns what was shared."""
    av_params: dict[str, nn.Parameter] = {}
    for name, p in _body(av_model).named_parameters():
        if "lora_" not in name:
            av_params[_plain_name(name)] = p
    shared: list[SharedParameter] = []
    body = _body(trunk)
    for full_name, p in list(body.named_parameters()):
        # Offloaded weights (device "meta") have no values to compare; they stay as they are.
        if "lora_" in full_name or p.requires_grad or p.device.type == "meta":
            continue
        q = av_params.get(_plain_name(full_name))
        if q is None or q is p or q.requires_grad or q.shape != p.shape or q.dtype != p.dtype or q.device != p.device:
            continue
        if not torch.equal(q, p):
            continue
        module_name, _, attr = full_name.rpartition(".")
        owner = body.get_submodule(module_name) if module_name else body
        setattr(owner, attr, q)
        shared.append(SharedParameter(owner, attr))
    return shared


def unshare(shared: list[SharedParameter]) -> None:
    """Give every shared trunk parameter its own copy again."""
    for s in shared:
        p = getattr(s.owner, s.name)
        setattr(s.owner, s.name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    shared.clear()


def unique_parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of parameter storage the modules hold together, each shared tensor counted once."""
    seen: set[tuple[int, torch.device]] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            key = (p.untyped_storage().data_ptr(), p.device)
            if key in seen:
                continue
            seen.add(key)
            total += p.untyped_storage().nbytes()
    return total
