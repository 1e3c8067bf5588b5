"""AlexWortega's universal NLA (one Qwen3 trunk, per-model linear maps), from a tiny Qwen3.

Followed: AlexWortega/qwen3-1p7b-nla — the AV multi-model trainer (saves `av/` LoRA,
`adapters/`, and the `nla_model_universal` sidecar with `ACTOR_TEMPLATE` holding
`{model_tag}`; injects `normalize(enc_M(h_M), √d_shared)` at the marker embedding of the
chat-templated prompt), the AR multi-model trainer (`get_peft_model(NLACriticModel, task_type=
None)` saved as `ar/`, sidecar `nla_ar_universal` with `critic_template` holding `{z}`, prompt
encoded without special tokens, last token, never-saved identity value head) and
`nla/enc_dec_adapters.py` (`ModelPoolAdapters.save`: `adapters.safetensors` with
`encoders.<tag>.weight` / `decoders.<tag>.weight`, `meta.json`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_interop_reference import captured_embeddings, chat_ids, replace_embeds, tiny_path

from nla.errors import NLAError
from nla.interop import detect_layout, import_layout
from nla.universal.bundle import UniversalNLA

K = 2
CHAR = chr(0x3223)
ACTOR = ("You are a meticulous AI researcher investigating activation vectors from {model_tag}, a small "
         "open-weight language model.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\n"
         "Please provide the description.")
CRITIC = "Summary of the following text: <text>{z}</text> <summary>"
DIMS = {"gpt2-tiny": 32, "llama-tiny": 64, "qwen2-tiny": 48}
ANCHOR = "qwen2-tiny"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Critic(torch.nn.Module):
    """Their `NLACriticModel.from_pretrained(ar_base, nla_num_layers=K)` with an identity head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(tiny_path("qwen3"))
        cfg.num_hidden_layers = K + 1
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[: K + 1]
        self.backbone = AutoModelForCausalLM.from_pretrained(tiny_path("qwen3"), config=cfg)
        self.backbone.lm_head = torch.nn.Identity()
        self.backbone.model.norm = torch.nn.Identity()
        d = cfg.hidden_size
        self.value_head = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.value_head.weight.copy_(torch.eye(d))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.value_head(self.backbone.model(input_ids=input_ids).last_hidden_state)


def write_universal(root: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trunk = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(trunk)
    torch.manual_seed(31)
    get_peft_model(AutoModelForCausalLM.from_pretrained(trunk),
                   LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=TARGETS,
                              init_lora_weights=False)).save_pretrained(root / "av")
    torch.manual_seed(32)
    get_peft_model(Critic(), LoraConfig(r=4, lora_alpha=8, task_type=None, target_modules=TARGETS,
                                        init_lora_weights=False)).save_pretrained(root / "ar")
    d = 64
    gen = torch.Generator().manual_seed(33)
    tensors = {}
    for tag, dm in DIMS.items():
        tensors[f"encoders.{tag}.weight"] = torch.randn(d, dm, generator=gen) / dm**0.5
        tensors[f"decoders.{tag}.weight"] = torch.randn(dm, d, generator=gen) / d**0.5
    (root / "adapters").mkdir()
    save_file(tensors, str(root / "adapters" / "adapters.safetensors"))
    (root / "adapters" / "meta.json").write_text(json.dumps({"d_shared": d, "model_dims": DIMS,
                                                             "adapter_class": "LinearAdapter", "adapter_kwargs": {}}))
    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    ids = chat_ids(tok, ACTOR.format(model_tag="qwen3-1p7b", injection_char=CHAR))
    p = ids.index(marker_id)
    training = [t for t in DIMS if t != ANCHOR]
    meta = {"kind": "nla_model_universal", "av_base": trunk, "d_shared": d, "injection_scale": "sqrt_d_model",
            "tokens": {"injection_char": CHAR, "injection_token_id": marker_id,
                       "injection_left_neighbor_id": ids[p - 1], "injection_right_neighbor_id": ids[p + 1]},
            "prompt_templates": {"actor": ACTOR}, "training_tags": training, "anchor_tag": ANCHOR}
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True, sort_keys=False))
    ar_meta = {"kind": "nla_ar_universal", "ar_base": trunk, "layer_index": K, "d_shared": d,
               "training_tags": training, "anchor_tag": ANCHOR, "critic_template": CRITIC}
    (root / "ar" / "nla_meta.yaml").write_text(yaml.safe_dump(ar_meta, sort_keys=False))
    return root


def reference_check(u: UniversalNLA, root: Path, tag: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trunk = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(trunk)
    pool = load_file(str(root / "adapters" / "adapters.safetensors"))
    d, dm = 64, DIMS[tag]
    h = torch.randn(dm, generator=torch.Generator().manual_seed(9))
    z = pool[f"encoders.{tag}.weight"] @ h  # enc_M(h_M)
    ids = chat_ids(tok, ACTOR.format(model_tag=tag, injection_char=CHAR))
    p = ids.index(tok.encode(CHAR, add_special_tokens=False)[0])
    av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trunk), str(root / "av")).eval()
    ref_emb = replace_embeds(av, ids, p, z, math.sqrt(d))
    assert u.nla.verbalizer.prompt_ids(tag) == ids
    ours_emb, ours_logits = captured_embeddings(u.nla, ids, u.encode(tag, h))
    assert torch.allclose(ours_emb, ref_emb, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ours_logits, av(inputs_embeds=ref_emb).logits, atol=1e-4)

    critic = PeftModel.from_pretrained(Critic(), str(root / "ar")).eval()
    texts = ["an explanation", "numbers in a table"]
    expected = []
    for t in texts:
        row = tok(CRITIC.format(z=t.strip()), add_special_tokens=False).input_ids
        with torch.no_grad():
            pred = critic(torch.tensor([row]))[0, -1].float()
        expected.append(pool[f"decoders.{tag}.weight"] @ pred)  # dec_M back to M's space
    got = u.reconstruct(tag, texts)
    assert got.shape == (2, dm)
    assert torch.allclose(got, torch.stack(expected), atol=1e-4)


def test_universal_release_matches_recipe_and_round_trips(tmp_path: Path) -> None:
    from nla.cli import main

    root = write_universal(tmp_path / "Qwen1.7bnla")
    assert detect_layout(root) == "universal"
    u = UniversalNLA.from_pretrained(root)
    assert set(u.tags) == set(DIMS) and u.anchor == ANCHOR
    for tag in ("gpt2-tiny", "llama-tiny"):
        reference_check(u, root, tag)
    explanations, recon = u.round_trip("gpt2-tiny", torch.randn(2, 32), max_new_tokens=4)
    assert len(explanations) == 2 and recon.shape == (2, 32)
    out = tmp_path / "bundle"
    assert main(["import", str(root), "--out", str(out)]) == 0
    assert yaml.safe_load((out / "nla_meta.yaml").read_text())["extra"]["universal"]["anchor"] == ANCHOR
    again = UniversalNLA.from_pretrained(out)
    for tag in ("gpt2-tiny", "llama-tiny"):
        reference_check(again, root, tag)


def test_add_model_and_width_errors(tmp_path: Path) -> None:
    u = import_layout(write_universal(tmp_path / "uni"))
    enc, dec = torch.nn.Linear(40, 64), torch.nn.Linear(64, 40)
    u.add_model("new-tiny", enc, dec, {"model": "tiny:gemma", "layer": 2})
    assert u.reconstruct("new-tiny", ["x"]).shape == (1, 40)
    with pytest.raises(NLAError, match="width 32"):
        u.encode("gpt2-tiny", torch.randn(1, 64))
    with pytest.raises(NLAError, match="unknown model tag"):
        u.encode("nope", torch.randn(1, 64))
    with pytest.raises(NLAError, match="d_M"):
        u.add_model("bad", torch.nn.Linear(8, 32), torch.nn.Linear(64, 8))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root, m, a: m.update(anchor_tag="other"), "anchor_tag"),
        (lambda root, m, a: a.update(d_shared=32), "contradictory"),
        (lambda root, m, a: a.pop("layer_index"), "layer_index"),
        (lambda root, m, a: a.pop("critic_template"), "critic_template"),
        (lambda root, m, a: (root / "adapters" / "meta.json").write_text(
            json.dumps({"d_shared": 64, "model_dims": {**DIMS, "ghost": 8}})), "ghost"),
        (lambda root, m, a: (root / "adapters" / "meta.json").write_text(
            json.dumps({"d_shared": 64, "model_dims": DIMS, "adapter_class": "ConvAdapter"})), "adapter_class"),
        (lambda root, m, a: m["tokens"].update(injection_left_neighbor_id=3), "tokens.injection_left_neighbor_id"),
    ],
)
def test_bad_universal_files_name_the_field(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    root = write_universal(tmp_path / "uni")
    data = yaml.safe_load((root / "nla_meta.yaml").read_text())
    ar_data = yaml.safe_load((root / "ar" / "nla_meta.yaml").read_text())
    change(root, data, ar_data)
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    (root / "ar" / "nla_meta.yaml").write_text(yaml.safe_dump(ar_data, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        import_layout(root)


def test_release_without_ar_sidecar_needs_only_the_layer(tmp_path: Path) -> None:
    """No ar/nla_meta.yaml: their trainer's CRITIC_TEMPLATE is used; K must come from --layer."""
    root = write_universal(tmp_path / "uni")
    (root / "ar" / "nla_meta.yaml").unlink()
    with pytest.raises(NLAError, match="--layer"):
        import_layout(root)
    reference_check(import_layout(root, layer=K), root, "gpt2-tiny")
