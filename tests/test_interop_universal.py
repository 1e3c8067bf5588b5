"""Cross-architecture universal bundles: shared tiny-Qwen3 trunk, enc/dec maps for gpt2 and llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_interop_reference import (
    apply_head,
    captured_embeddings,
    chat_ids,
    random_head,
    replace_embeds,
    tiny_path,
)

from nla.errors import NLAError
from nla.interop import UniversalNLA, detect_layout, import_layout

K = 2
AV_TEMPLATE = "Model: {model_tag}\n<concept>{injection_char}</concept>\nExplain."
AR_TEMPLATE = "{explanation}\nThe thought:"
CHAR = chr(0x3223)
WIDTHS = {"gpt2-tiny": 32, "llama-tiny": 64}


def write_universal(root: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    trunk = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(trunk)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(31)
    get_peft_model(AutoModelForCausalLM.from_pretrained(trunk), lora).save_pretrained(root / "av")
    cfg = AutoConfig.from_pretrained(trunk)
    cfg.num_hidden_layers = K + 1
    cfg.layer_types = cfg.layer_types[: K + 1] if isinstance(getattr(cfg, "layer_types", None), list) else None
    torch.manual_seed(32)
    get_peft_model(AutoModel.from_pretrained(trunk, config=cfg), lora).save_pretrained(root / "ar")
    d = cfg.hidden_size
    save_file(random_head(d, d, 33, bias=False), str(root / "ar" / "value_head.safetensors"))
    for i, (tag, dm) in enumerate(WIDTHS.items()):
        (root / "adapters" / tag).mkdir(parents=True)
        save_file(random_head(dm, d, 40 + i, bias=True), str(root / "adapters" / tag / "enc.safetensors"))
        save_file(random_head(d, dm, 50 + i, bias=True), str(root / "adapters" / tag / "dec.safetensors"))
    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    ids = chat_ids(tok, AV_TEMPLATE.format(model_tag="gpt2-tiny", injection_char=CHAR))
    p = ids.index(marker_id)
    meta = {"kind": "nla_universal", "schema_version": 1, "trunk": "tiny:qwen3", "d_shared": d, "layer_index": K,
            "anchor": "qwen3-tiny", "tags": ["qwen3-tiny", *WIDTHS],
            "models": {t: {"model": f"tiny:{t.split('-')[0]}", "layer": 2, "d_model": w} for t, w in WIDTHS.items()},
            "tokens": {"injection_char": CHAR, "injection_token_id": marker_id,
                       "injection_left_neighbor_id": ids[p - 1], "injection_right_neighbor_id": ids[p + 1]},
            "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE}}
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    return root


def reference_check(u: UniversalNLA, root: Path, tag: str) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    trunk = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(trunk)
    d, dm = 64, WIDTHS[tag]
    enc = load_file(str(root / "adapters" / tag / "enc.safetensors"))
    dec = load_file(str(root / "adapters" / tag / "dec.safetensors"))
    h = torch.randn(dm, generator=torch.Generator().manual_seed(9))
    z = apply_head(enc, h)  # enc_M(h_M) in the shared space
    ids = chat_ids(tok, AV_TEMPLATE.format(model_tag=tag, injection_char=CHAR))  # the tag given as text
    p = ids.index(tok.encode(CHAR, add_special_tokens=False)[0])
    av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trunk), str(root / "av")).eval()
    ref_emb = replace_embeds(av, ids, p, z, math.sqrt(d))
    assert u.nla.verbalizer.prompt_ids(tag) == ids
    ours_emb, _ = captured_embeddings(u.nla, ids, u.encode(tag, h))
    assert torch.allclose(ours_emb, ref_emb, atol=1e-5)

    cfg = AutoConfig.from_pretrained(trunk)
    cfg.num_hidden_layers = K + 1
    ar = PeftModel.from_pretrained(AutoModel.from_pretrained(trunk, config=cfg), str(root / "ar")).eval()
    ar.get_base_model().norm = torch.nn.Identity()
    head = load_file(str(root / "ar" / "value_head.safetensors"))
    text = "an explanation"
    ids_ar = tok(AR_TEMPLATE.format(explanation=text), add_special_tokens=True).input_ids
    with torch.no_grad():
        hidden = ar(input_ids=torch.tensor([ids_ar])).last_hidden_state[0, -1].float()
    expected = apply_head(dec, apply_head(head, hidden))  # dec_M(AR(text)) in M's native space
    got = u.reconstruct(tag, [text])
    assert got.shape == (1, dm)
    assert torch.allclose(got[0], expected, atol=1e-4)


def test_universal_bundle_matches_recipe_and_round_trips(tmp_path: Path) -> None:
    root = write_universal(tmp_path / "uni")
    assert detect_layout(root) == "universal"
    u = UniversalNLA.from_pretrained(root)
    assert set(u.tags) == {"qwen3-tiny", *WIDTHS}
    for tag in WIDTHS:
        reference_check(u, root, tag)
    # The anchor's space is the shared space: identity maps.
    x = torch.randn(2, 64)
    assert torch.equal(u.encode("qwen3-tiny", x), x)
    explanations, recon = u.round_trip("gpt2-tiny", torch.randn(2, 32), max_new_tokens=4)
    assert len(explanations) == 2 and recon.shape == (2, 32)
    # `nla import` writes our bundle + adapters/; UniversalNLA reads it back identically.
    from nla.cli import main

    out = tmp_path / "bundle"
    assert main(["import", str(root), "--out", str(out)]) == 0
    assert yaml.safe_load((out / "nla_meta.yaml").read_text())["extra"]["universal"]["anchor"] == "qwen3-tiny"
    again = UniversalNLA.from_pretrained(out)
    for tag in WIDTHS:
        reference_check(again, root, tag)


def test_add_model_and_width_errors(tmp_path: Path) -> None:
    u = import_layout(write_universal(tmp_path / "uni"))
    enc, dec = torch.nn.Linear(48, 64), torch.nn.Linear(64, 48)
    u.add_model("qwen2-tiny", enc, dec, {"model": "tiny:qwen2", "layer": 2})
    assert u.reconstruct("qwen2-tiny", ["x"]).shape == (1, 48)
    with pytest.raises(NLAError, match="width 32"):
        u.encode("gpt2-tiny", torch.randn(1, 64))
    with pytest.raises(NLAError, match="unknown model tag"):
        u.encode("nope", torch.randn(1, 64))
    with pytest.raises(NLAError, match="d_M"):
        u.add_model("bad", torch.nn.Linear(8, 32), torch.nn.Linear(64, 8))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root, m: m.update(anchor="other"), "anchor"),
        (lambda root, m: m.pop("d_shared"), "d_shared"),
        (lambda root, m: m["tags"].append("ghost"), "tags"),
        (lambda root, m: (root / "adapters" / "gpt2-tiny" / "dec.safetensors").unlink(), "dec.safetensors"),
        (lambda root, m: m["tokens"].update(marker=chr(0x3224)), "contradictory"),
    ],
)
def test_bad_universal_sidecar_names_the_field(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    root = write_universal(tmp_path / "uni")
    data = yaml.safe_load((root / "nla_meta.yaml").read_text())
    change(root, data)
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        import_layout(root)
