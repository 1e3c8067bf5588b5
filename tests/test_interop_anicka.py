"""anicka's NLAs (anicka-net/nla-at-home), from a tiny Qwen2 (no BOS) and a tiny Llama (BOS).

Followed: `scripts/nla_lib.py` (`make_av_prompt`, `INJECTION_SCALE`, `AR_TEMPLATE_DEPTH_SL`,
`AR_TEMPLATE_RECONSTRUCT`, `LoraSLReward.reconstruct`: `hidden_states[L + 1]` at the last token,
no special tokens) and `scripts/brain_in_jar_qwen.py` (`verbalize`: the raw prompt encoded with
`add_special_tokens=True`, the marker embedding replaced by `normalize_activation(v, 150)`;
`ar_score`: frozen base + `ar_head` read at `hidden_states[L + 1]`). One PEFT adapter per repo,
`-av-v2` / `-ar-v2` names, or `av/` and `ar/` folders of one repo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_interop_reference import tiny_path

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

LAYER = 2
DEPTH = 63  # the depth the adapter was "trained" with: it is only text in the prompt
CHAR = chr(0x3221)


def make_av_prompt(depth_pct: int, injection_char: str) -> str:
    return (
        "You are a meticulous AI researcher conducting an important investigation "
        "into activation vectors from a language model. Your overall task is to "
        "describe the semantic content of that activation vector.\n\n"
        "We will pass the vector enclosed in <concept> tags into your context, "
        "along with the network depth where it was extracted. "
        "You must then produce an explanation for the vector, enclosed within "
        "<explanation> tags. The explanation consists of 2-3 text snippets "
        "describing that vector.\n\n"
        f"Here is the vector from depth {depth_pct}% of the network:\n\n"
        f"<concept>{injection_char}</concept>\n\n"
        "Please provide an explanation.\n\n"
        "<explanation>"
    )


AR_DEPTH_SL = "Summary of the following text from depth {depth}%: <text>{explanation}</text> <summary>{inj}"
AR_RECONSTRUCT = (
    "You are a meticulous AI researcher conducting an important investigation "
    "into a model's internal states. Below is a description of an activation vector:\n\n"
    "<explanation>{explanation}</explanation>\n\n"
    "Based on this description, reconstruct the activation vector."
)


def _lora(seed: int) -> Any:
    from peft import LoraConfig

    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)


def write_release(root: Path, arch: str, ar_form: str, *, subfolders: bool = False) -> tuple[Path, Path]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_path(arch)
    tok = AutoTokenizer.from_pretrained(base)
    char = CHAR if arch != "llama" else "|"
    if subfolders:
        av_dir, ar_dir = root / "nla-tiny-v2" / "av", root / "nla-tiny-v2" / "ar"
    else:
        av_dir, ar_dir = root / "nla-tiny-L2-av-v2", root / "nla-tiny-L2-ar-v2"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora(51)).save_pretrained(av_dir)
    tok.save_pretrained(av_dir)
    d = AutoModelForCausalLM.from_pretrained(base).config.hidden_size
    if ar_form == "lora_sl":
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), _lora(52)).save_pretrained(ar_dir)
    else:
        ar_dir.mkdir(parents=True)
        gen = torch.Generator().manual_seed(53)
        save_file({"weight": torch.randn(d, d, generator=gen) / d**0.5}, str(ar_dir / "ar_head.safetensors"))
    tok.save_pretrained(ar_dir)
    meta = {"kind": "nla_model", "d_model": d, "extraction_layer_index": LAYER,
            "extraction": {"injection_scale": 150.0},
            "tokens": {"injection_char": char, "injection_token_id": tok.encode(char, add_special_tokens=False)[0]},
            "base_model": base}
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    return av_dir, ar_dir


def reference_check(nla: NLA, arch: str, av_dir: Path, ar_dir: Path, char: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_path(arch)
    tok = AutoTokenizer.from_pretrained(base)
    d = nla.meta.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(4)) * 3.0
    tokens = tok.encode(make_av_prompt(DEPTH, char), add_special_tokens=True)
    assert nla.verbalizer.prompt_ids() == tokens
    inject_pos = tokens.index(tok.encode(char, add_special_tokens=False)[0])
    av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(av_dir)).eval()
    emb = av.get_input_embeddings()(torch.tensor([tokens])).clone()
    emb[0, inject_pos, :] = v * (150.0 / v.norm())
    with torch.no_grad():
        ref_logits = av(inputs_embeds=emb).logits
        ref_gen = av.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist()
    with torch.no_grad(), nla.verbalizer.injector(v.unsqueeze(0)):
        logits = nla.av_model(input_ids=torch.tensor([tokens])).logits
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    ours = nla.verbalize(v.unsqueeze(0), max_new_tokens=6)[0][0]
    assert ours.token_ids and ref_gen[: len(ours.token_ids)] == ours.token_ids
    # Their prompt already opens the tag, so their AV writes only the text and "</explanation>":
    # that must parse as the explanation, not as "unparseable".
    answer = nla.verbalizer._decode(tok.encode(" cooking instructions</explanation>", add_special_tokens=False))
    assert answer.explanation == "cooking instructions"

    texts = ["- Recipe for Thai green curry\n- cooking instructions", "a legal clause"]
    if (ar_dir / "ar_head.safetensors").exists():
        from safetensors.torch import load_file

        backbone = AutoModelForCausalLM.from_pretrained(base).eval()
        head = load_file(str(ar_dir / "ar_head.safetensors"))["weight"]
        rows = [tok.encode(AR_RECONSTRUCT.replace("{explanation}", t), add_special_tokens=True) for t in texts]
        with torch.no_grad():
            expected = torch.stack([backbone.model(input_ids=torch.tensor([r]), output_hidden_states=True)
                                    .hidden_states[LAYER + 1][0, -1] @ head.T for r in rows])
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ar_dir)).eval()
        template = AR_DEPTH_SL.replace("{depth}", str(DEPTH)).replace("{inj}", char)
        rows = [tok.encode(template.replace("{explanation}", t), add_special_tokens=False) for t in texts]
        with torch.no_grad():
            expected = torch.stack([model(input_ids=torch.tensor([r]), output_hidden_states=True)
                                    .hidden_states[LAYER + 1][0, -1].float() for r in rows])
    assert torch.allclose(nla.reconstruct(texts), expected, atol=1e-4)


@pytest.mark.parametrize(("arch", "ar_form"), [("qwen2", "lora_sl"), ("llama", "ar_head")])
def test_anicka_pair_matches_their_scripts(tmp_path: Path, arch: str, ar_form: str) -> None:
    from nla.cli import main

    av_dir, ar_dir = write_release(tmp_path, arch, ar_form)
    char = CHAR if arch != "llama" else "|"
    assert detect_layout(av_dir) == "anicka"
    with pytest.raises(NLAError, match="--depth-pct"):  # not in their sidecar: by hand or from the registry
        import_layout(av_dir)
    nla = import_layout(av_dir, depth_pct=DEPTH)  # the -ar-v2 sibling pairs by name
    assert nla.meta.injection.scale == 150.0 and nla.meta.layer_index == LAYER
    reference_check(nla, arch, av_dir, ar_dir, char)
    out = tmp_path / "bundle"
    assert main(["import", str(av_dir), "--depth-pct", str(DEPTH), "--out", str(out)]) == 0
    reference_check(NLA.from_pretrained(out), arch, av_dir, ar_dir, char)


def test_av_and_ar_subfolders_of_one_repo(tmp_path: Path) -> None:
    av_dir, ar_dir = write_release(tmp_path, "qwen2", "lora_sl", subfolders=True)
    assert detect_layout(av_dir.parent) == "anicka"
    nla = import_layout(av_dir.parent, depth_pct=DEPTH)
    reference_check(nla, "qwen2", av_dir, ar_dir, CHAR)


def test_wrong_marker_id_is_named(tmp_path: Path) -> None:
    av_dir, _ = write_release(tmp_path, "qwen2", "lora_sl")
    data = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    data["tokens"]["injection_token_id"] = 7
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(NLAError, match=r"tokens\.injection_token_id"):
        import_layout(av_dir, depth_pct=DEPTH)
