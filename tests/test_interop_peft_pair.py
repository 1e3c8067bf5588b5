"""PEFT adapter pairs with a separate value head, from a tiny Llama (BOS in every input)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_interop_reference import (
    apply_head,
    captured_embeddings,
    chat_ids,
    random_head,
    replace_embeds,
    tiny_path,
)

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

K = 2
AV_TEMPLATE = "Thought vector: <concept>{marker}</concept>\nWhat is it?"
AR_TEMPLATE = "Explanation: {explanation}\nVector:"


def _lora() -> object:
    from peft import LoraConfig

    # init_lora_weights=False: random B, so the adapters really change the outputs.
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def write_pair(root: Path, *, num_layers: int | None, readout: int | None, head_file: str) -> Path:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from nla.models.injection import find_marker
    from nla.models.prompts import encode_rendered, render_chat

    base = tiny_path("llama")
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(21)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora()).save_pretrained(root / "av")
    depth = num_layers or K + 1
    cfg = AutoConfig.from_pretrained(base)
    cfg.num_hidden_layers = depth
    torch.manual_seed(22)
    get_peft_model(AutoModel.from_pretrained(base, config=cfg), _lora()).save_pretrained(root / "ar")
    d = cfg.hidden_size
    head = random_head(d, d, 23, bias=head_file == "linear_head.pt")
    if head_file.endswith(".pt"):
        torch.save({f"linear.{k}": v for k, v in head.items()}, root / "ar" / head_file)
    else:
        from safetensors.torch import save_file

        save_file(head, str(root / "ar" / head_file))
    tokens = find_marker(lambda m: render_chat(tok, AV_TEMPLATE.replace("{marker}", m)),
                         lambda t: encode_rendered(tok, t), tok)
    meta: dict[str, object] = {
        "kind": "nla_peft_pair", "layer_index": K, "d_model": d,
        "injection": {"mode": "replace", "scale": 40.0},
        "tokens": tokens.to_dict(), "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
        "ar": {"value_head": head_file},
    }
    if num_layers is not None:
        meta["ar"] = {"num_layers": num_layers, "readout_layer": readout, "value_head": head_file}
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    return root


def reference_check(nla: NLA, root: Path, depth: int, readout: int) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from nla.interop.common import _read_tensors

    meta = yaml.safe_load((root / "nla_meta.yaml").read_text())
    base = tiny_path("llama")
    tok = AutoTokenizer.from_pretrained(base)
    marker = meta["tokens"]["marker"]
    ids = chat_ids(tok, AV_TEMPLATE.replace("{marker}", marker))
    p = ids.index(meta["tokens"]["marker_id"])
    d = meta["d_model"]
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(root / "av")).eval()
    ref_emb = replace_embeds(av, ids, p, v, 40.0)
    with torch.no_grad():
        ref_logits = av(inputs_embeds=ref_emb).logits
    ours_emb, ours_logits = captured_embeddings(nla, ids, v.unsqueeze(0))
    assert torch.allclose(ours_emb, ref_emb, atol=1e-6)
    assert torch.allclose(ours_logits, ref_logits, atol=1e-5)

    cfg = AutoConfig.from_pretrained(base)
    cfg.num_hidden_layers = depth
    trunk = PeftModel.from_pretrained(AutoModel.from_pretrained(base, config=cfg), str(root / "ar")).eval()
    trunk.get_base_model().norm = torch.nn.Identity()
    head = _read_tensors(root / "ar" / meta["ar"]["value_head"])
    head = {k.split(".")[-1]: t for k, t in head.items()}
    texts = ["one short", "a second, longer explanation"]
    expected = []
    for t in texts:
        ids_ar = tok(AR_TEMPLATE.format(explanation=t), add_special_tokens=True).input_ids
        assert ids_ar[0] == tok.bos_token_id
        with torch.no_grad():
            hs = trunk(input_ids=torch.tensor([ids_ar]), output_hidden_states=True).hidden_states
        expected.append(apply_head(head, hs[readout + 1][0, -1].float()))
    assert torch.allclose(nla.reconstruct(texts), torch.stack(expected), atol=1e-4)


@pytest.mark.parametrize(
    ("num_layers", "readout", "head_file"),
    [(None, None, "value_head.safetensors"), (4, 1, "linear_head.pt"), (3, 2, "value_head.pt")],
)
def test_peft_pair_matches_recipe(tmp_path: Path, num_layers: int | None, readout: int | None, head_file: str) -> None:
    root = write_pair(tmp_path / "pair", num_layers=num_layers, readout=readout, head_file=head_file)
    assert detect_layout(root) == "peft_pair"
    nla = NLA.from_pretrained(root)
    depth, read = num_layers or K + 1, readout if readout is not None else K
    assert nla.meta.injection.scale == 40.0
    reference_check(nla, root, depth, read)
    out = tmp_path / "bundle"
    import_layout(root, out)
    reference_check(NLA.from_pretrained(out), root, depth, read)


def test_readout_and_template_overrides(tmp_path: Path) -> None:
    root = write_pair(tmp_path / "pair", num_layers=None, readout=None, head_file="value_head.safetensors")
    nla = import_layout(root, readout_layer=1, ar_template="Says: {explanation}")
    assert nla.ar.template == "Says: {explanation}"
    assert nla.meta.ar_format == "full"  # read-out block != K: merged into a full trunk
    with pytest.raises(NLAError, match=r"ar\.readout_layer"):
        import_layout(root, readout_layer=5)


def test_4bit_needs_bitsandbytes(tmp_path: Path) -> None:
    import importlib.util

    root = write_pair(tmp_path / "pair", num_layers=None, readout=None, head_file="value_head.safetensors")
    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        assert getattr(import_layout(root, load_in_4bit=True).av_model, "is_loaded_in_4bit", False)
        return
    with pytest.raises(NLAError, match="4-bit"):
        import_layout(root, load_in_4bit=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("layer_index"), "layer_index"),
        (lambda m: m.update(base_model="tiny:qwen2"), "contradictory"),
        (lambda m: m["tokens"].pop("left_id"), "tokens.left_id"),
        (lambda m: m["injection"].update(mode="splice"), "injection.mode"),
        (lambda m: m["ar"].update(value_head="missing.pt"), "missing.pt"),
        (lambda m: m["injection"].update(scale=-1), "injection.scale"),
    ],
)
def test_bad_sidecar_names_the_field(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    root = write_pair(tmp_path / "pair", num_layers=None, readout=None, head_file="value_head.safetensors")
    data = yaml.safe_load((root / "nla_meta.yaml").read_text())
    change(data)
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        import_layout(root)
