"""Architecture-generic access to the decoder blocks, found by structure, never by model name.

The layer convention (docs/design.md §2): ``layer_index = K`` is the output of decoder block K
(0-based), which is ``output_hidden_states[K + 1]`` in transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nla.errors import NLAError


def text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it)."""
    return getattr(config, "text_config", None) or config


def _config_int(config: Any, names: tuple[str, ...], what: str) -> int:
    """The first int among ``names`` on the text config: architectures spell one field differently."""
    cfg = text_config(config)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise NLAError(f"cannot tell the {what} of a {type(config).__name__}")


def num_layers(config: Any) -> int:
    return _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")


def hidden_size(config: Any) -> int:
    return _config_int(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def default_layer(n_layers: int) -> int:
    """docs/design.md §2: two thirds of the way up."""
    return (2 * n_layers) // 3


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: the shallowest ModuleList whose length is the layer count.

    Matching on structure keeps this working for Llama (``model.layers``), GPT-2 (``h``),
    Gemma, PEFT wrappers and anything else transformers adds, without a table of names.
    """
    config = getattr(model, "config", None)
    expected = num_layers(config) if config is not None else None
    best: tuple[int, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if expected is not None and len(module) != expected:
            continue
        depth = name.count(".")
        if best is None or depth < best[0]:
            best = (depth, module)
    if best is None:
        raise NLAError(f"no decoder block list found in {type(model).__name__}")
    return best[1]


def check_layer(layer: int, n_layers: int) -> int:
    if not 0 <= layer < n_layers:
        raise NLAError(f"layer {layer} is out of range: the model has blocks 0..{n_layers - 1}")
    return layer


def truncate_blocks(model: nn.Module, layer: int) -> nn.Module:
    """Keep blocks 0..layer in place (the reconstructor trunk); the config says K + 1 layers."""
    blocks = decoder_blocks(model)
    check_layer(layer, len(blocks))
    del blocks[layer + 1 :]
    truncate_config(model.config, layer)
    return model


def truncate_config(config: Any, layer: int) -> Any:
    """The (text) config of a model cut after block ``layer``: it says K + 1 layers."""
    cfg = text_config(config)
    check_layer(layer, num_layers(cfg))
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, layer + 1)
    # Per-layer lists (Gemma 3 sliding/full attention pattern) must shrink with the blocks.
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: layer + 1]
    return cfg
