"""Solshine's Gemma-4-E2B NLA layout, from a tiny Gemma (BOS, √d-scaled embeddings).

Followed: SolshineCode/nla-gemma-4-e2b `examples/round_trip_example.py` (two PEFT repos; AV
prompt `tok.encode(AV_TEMPLATE.format(...))` with BOS and no chat template; the embedding-output
hook that replaces the marker row with the vector normalised to √d; the AR = full-depth base +
LoRA read at `layers[AR_TRUNCATION - 1]`, `linear_head.pt` with bias) and
`trajectory/step_000200/nla_meta.yaml` (the sidecar: `role: actor`, `extraction.{d_model, layer}`,
token ids only). The reference below re-implements that script's three steps with plain
transformers/PEFT calls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_interop_reference import tiny_path

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

LAYER = 2
AR_TRUNCATION = 2  # the AR reads layers[1], not block LAYER: the release does the same (18 vs 23)
CHAR = chr(0x3221)
AV_TEMPLATE = (  # the release's template, as the example script sends it
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from "
    "a language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets "
    "describing that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>"
)
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


def _lora(seed: int) -> Any:
    from peft import LoraConfig

    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def write_release(root: Path) -> tuple[Path, Path]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_path("gemma")
    tok = AutoTokenizer.from_pretrained(base)
    av_dir, ar_dir = root / "gemma-tiny-nla-L2-av-v0_0_1", root / "gemma-tiny-nla-L2-ar-v0_0_1"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora(41)).save_pretrained(av_dir)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora(42)).save_pretrained(ar_dir)
    d = AutoModelForCausalLM.from_pretrained(base).config.hidden_size
    torch.manual_seed(43)
    torch.save(torch.nn.Linear(d, d, bias=True).state_dict(), ar_dir / "linear_head.pt")
    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    ids = tok.encode(AV_TEMPLATE.format(injection_char=CHAR))
    p = ids.index(marker_id)
    meta = {"kind": "nla_model", "role": "actor", "version": "v0.0.1", "base_model": base,
            "extraction": {"d_model": d, "layer": LAYER, "injection_scale": "sqrt_d_model", "mse_scale": "sqrt_d_model"},
            "tokens": {"injection_token_id": marker_id, "injection_left_neighbor_id": ids[p - 1],
                       "injection_right_neighbor_id": ids[p + 1]},
            "av_lora": {"r": 4, "alpha": 8}, "training": {"lr": 1e-4}}
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return av_dir, ar_dir


def reference_check(nla: NLA, av_dir: Path, ar_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_path("gemma")
    tok = AutoTokenizer.from_pretrained(base)
    d = nla.meta.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 7.0
    vec = v / (v.norm() + 1e-9) * math.sqrt(d)  # extract_activation's normalisation
    ids = tok.encode(AV_TEMPLATE.format(injection_char=CHAR))
    assert ids[0] == tok.bos_token_id
    av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(av_dir)).eval()
    p = ids.index(tok.encode(CHAR, add_special_tokens=False)[0])
    seen: list[torch.Tensor] = []

    def hook(module, inputs, output):  # type: ignore[no-untyped-def]
        if output.shape[1] <= 1:
            return output
        h = output.clone()
        h[0, p] = vec.to(h.dtype)
        seen.append(h)
        return h

    handle = av.get_input_embeddings().register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref_logits = av(input_ids=torch.tensor([ids])).logits
            ref_gen = av.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    finally:
        handle.remove()
    assert nla.verbalizer.prompt_ids() == ids  # raw prompt, one BOS, no chat turn
    ours_emb: list[torch.Tensor] = []
    emb = nla.av_model.get_input_embeddings()
    with torch.no_grad(), nla.verbalizer.injector(v.unsqueeze(0)):
        h2 = emb.register_forward_hook(lambda m, i, o: ours_emb.append(o.detach().clone()))
        try:
            logits = nla.av_model(input_ids=torch.tensor([ids])).logits
        finally:
            h2.remove()
    assert torch.allclose(ours_emb[0], seen[0], atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    ours = nla.verbalize(v.unsqueeze(0), max_new_tokens=6)[0][0]
    assert ours.token_ids and ours.token_ids == ref_gen[: len(ours.token_ids)]

    ar = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ar_dir)).eval()
    head = torch.nn.Linear(d, d, bias=True)
    head.load_state_dict(torch.load(ar_dir / "linear_head.pt", weights_only=True))
    captured: dict[str, torch.Tensor] = {}
    layer = ar.base_model.model.model.layers[AR_TRUNCATION - 1]
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(h=(o[0] if isinstance(o, tuple) else o)))
    texts = ["a legal case about a new policy", "protest"]
    expected = []
    try:
        for t in texts:
            with torch.no_grad():
                ar(input_ids=torch.tensor([tok.encode(AR_TEMPLATE.format(explanation=t))]))
                expected.append(head(captured["h"][0, -1].float()))
    finally:
        handle.remove()
    assert torch.allclose(nla.reconstruct(texts), torch.stack(expected), atol=1e-4)


def test_solshine_pair_matches_the_example_script(tmp_path: Path) -> None:
    from nla.cli import main

    av_dir, ar_dir = write_release(tmp_path)
    assert detect_layout(av_dir) == "solshine" and detect_layout(ar_dir) == "solshine"
    with pytest.raises(NLAError, match="--ar-layer"):  # not in their files: given by hand or by the registry
        import_layout(av_dir)
    nla = import_layout(ar_dir, ar_layer=AR_TRUNCATION - 1)  # the AV is found by name
    assert nla.meta.injection.scale == pytest.approx(math.sqrt(nla.meta.d_model))
    assert (nla.meta.layer_index, nla.meta.base_model) == (LAYER, tiny_path("gemma"))
    reference_check(nla, av_dir, ar_dir)
    out = tmp_path / "bundle"
    assert main(["import", str(av_dir), "--ar-layer", str(AR_TRUNCATION - 1), "--out", str(out)]) == 0
    reference_check(NLA.from_pretrained(out), av_dir, ar_dir)  # raw template, head bias and depth survive


def test_solshine_errors_name_the_field(tmp_path: Path) -> None:
    av_dir, ar_dir = write_release(tmp_path)
    (ar_dir / "linear_head.pt").unlink()
    with pytest.raises(NLAError, match=r"linear_head\.pt"):
        import_layout(av_dir, ar=ar_dir, ar_layer=1)
    av_dir, ar_dir = write_release(tmp_path / "b")
    data = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    data["tokens"]["injection_left_neighbor_id"] = 5
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(NLAError, match=r"tokens\.injection_left_neighbor_id"):
        import_layout(av_dir, ar_layer=1)
