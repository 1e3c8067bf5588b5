"""nla.models.layers: decoder blocks found by structure, the layer convention, truncation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_ARCHS
from torch import nn

from nla.errors import NLAError
from nla.models.forward import BlockOutput
from nla.models.layers import (
    check_layer,
    decoder_blocks,
    default_layer,
    hidden_size,
    num_layers,
    text_config,
    truncate_blocks,
)
from nla.models.loading import load_model
from nla.models.tiny import TINY_SPECS

# Where each family keeps its blocks; the code never uses this table, the test checks against it.
BLOCK_PATHS = {
    "gemma": "model.layers",
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module, object]:
    model, tok = load_model(f"tiny:{request.param}", device="cpu")
    return request.param, model, tok


def _ids(tok: object, text: str = "The for statement is used to iterate over the elements of a sequence.") -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]


def test_decoder_blocks_found_by_structure(tiny: tuple[str, nn.Module, object]) -> None:
    arch, model, _ = tiny
    blocks = decoder_blocks(model)
    assert blocks is model.get_submodule(BLOCK_PATHS[arch])
    assert len(blocks) == num_layers(model.config) == TINY_SPECS[arch].n_layers
    assert hidden_size(model.config) == TINY_SPECS[arch].d_model


def test_decoder_blocks_inside_a_wrapper() -> None:
    # A wrapper (PEFT, a value-head module, ...) adds nesting and other ModuleLists; the
    # shallowest list with the layer count is still the block list.
    model, _ = load_model("tiny:llama", device="cpu")

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.config = inner.config
            self.heads = nn.ModuleList([nn.Linear(2, 2)])  # wrong length: ignored
            self.inner = inner

    wrapped = Wrapper(model)
    assert decoder_blocks(wrapped) is model.model.layers


def test_no_block_list_is_a_clear_error() -> None:
    with pytest.raises(NLAError, match="no decoder block list"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_default_layer_and_range() -> None:
    assert default_layer(30) == 20
    assert default_layer(4) == 2
    assert default_layer(18) == 12
    assert check_layer(0, 4) == 0 and check_layer(3, 4) == 3
    for bad in (-1, 4):
        with pytest.raises(NLAError, match=r"blocks 0\.\.3"):
            check_layer(bad, 4)


def test_layer_convention_block_output_is_hidden_states_k_plus_1(tiny: tuple[str, nn.Module, object]) -> None:
    """docs/design.md §2: layer K = output of block K = output_hidden_states[K + 1]."""
    _, model, tok = tiny
    ids = _ids(tok)
    n = num_layers(model.config)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        # The last entry of hidden_states has the final norm applied in most families, so the
        # convention is checked on every block but the last.
        for k in range(n - 1):
            with BlockOutput(model, k) as run:
                got = run(ids, torch.ones_like(ids))
            torch.testing.assert_close(got, ref[k + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_truncate_blocks(arch: str) -> None:
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    n = num_layers(model.config)
    k = 1
    trunk = truncate_blocks(copy.deepcopy(model), k)
    assert len(decoder_blocks(trunk)) == k + 1
    assert num_layers(trunk.config) == k + 1
    layer_types = getattr(text_config(trunk.config), "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == k + 1
    # The original is untouched and the trunk computes the same block-K output.
    assert len(decoder_blocks(model)) == n
    ids = _ids(tok)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[k + 1]
        captured: list[torch.Tensor] = []
        handle = decoder_blocks(trunk)[k].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        trunk(input_ids=ids)
        handle.remove()
    torch.testing.assert_close(captured[0], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(NLAError, match="out of range"):
        truncate_blocks(copy.deepcopy(model), n)
