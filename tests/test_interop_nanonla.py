"""nanoNLA checkpoints, from a tiny Qwen3, written the way their trainer writes them.

Followed: senku14x/nanoNLA `nla/train_sft.py` (the save block: AV `save_pretrained`; AR full =
`NLACriticModel.save_pretrained` + `value_head.safetensors`, AR LoRA =
`ar_lora_value_head.safetensors` + `ar_meta.json`; the dataset sidecar copied as
`nla_meta.yaml`), `nla/datagen/sidecar.py` (the sidecar fields), ceselder/nanoNLA
`nla/models.py` (the critic module) and `nla_inference.py` (`karvonen_inject_in_residual`:
`h + ||h|| v/||v||` at the output of layers[1]). The reference recipe below re-implements
those with plain transformers/PEFT calls; it also covers the rule that importing never runs
code from the folder.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_interop_reference import chat_ids, marker_neighbours, perturb, random_head, tiny_path

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

K = 2
CHAR = chr(0x3222)
ACTOR = "Activation: <concept>{injection_char}</concept>\nDescribe it."
CRITIC = "Summary of the following text: <text>{explanation}</text> <summary>"


def dataset_sidecar(tok: Any, d: int) -> dict[str, Any]:
    """`NLADatasetMeta` as `serialize_sidecar` writes it (stage av_sft, no injection recorded)."""
    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    _, left, right = marker_neighbours(tok, ACTOR.format(injection_char=CHAR), marker_id)
    suffix = tok(CRITIC.format(explanation="x"), add_special_tokens=False).input_ids[-3:]
    return {"dataset_id": "tiny-L2", "stage": "av_sft", "row_count": 100,
            "extraction": {"base_model": tiny_path("qwen3"), "d_model": d, "layer_index": K, "norm": "none",
                           "corpus": "tiny", "corpus_slice": {"start": 0, "end": 100}, "positions_per_doc": 10},
            "kind": "nla_dataset", "schema_version": 1, "keep_debug_metadata": True,
            "tokens": {"injection_char": CHAR, "injection_token_id": marker_id, "injection_left_neighbor_id": left,
                       "injection_right_neighbor_id": right, "critic_suffix_ids": suffix},
            "prompt_templates": {"actor": ACTOR, "critic": CRITIC}, "parent_datasets": [],
            "created_at": "2026-01-01T00:00:00+00:00", "created_by": "", "git_commit": "abc123"}


class Critic(torch.nn.Module):
    """Their `NLACriticModel`: `backbone` (a causal LM cut to K + 1 blocks) + `value_head`."""

    def __init__(self, keep_norm: bool = False):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.backbone = AutoModelForCausalLM.from_pretrained(tiny_path("qwen3"))
        del self.backbone.model.layers[K + 1:]
        self.backbone.config.num_hidden_layers = K + 1
        if isinstance(getattr(self.backbone.config, "layer_types", None), list):
            self.backbone.config.layer_types = self.backbone.config.layer_types[: K + 1]
        if not keep_norm:
            self.backbone.model.norm = torch.nn.Identity()
        self.backbone.lm_head = torch.nn.Identity()
        d = self.backbone.config.hidden_size
        self.value_head = torch.nn.Linear(d, d, bias=False)

    def last_hidden(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].float()


def write_nanonla(root: Path, *, ar_form: str = "full", keep_norm: bool = False) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(src)
    av_dir, ar_dir = root / "tiny-L2-av", root / "tiny-L2-ar"
    if ar_form == "lora":  # --use-lora: the AV is a PEFT adapter too
        torch.manual_seed(10)
        av = get_peft_model(AutoModelForCausalLM.from_pretrained(src),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    else:
        av = AutoModelForCausalLM.from_pretrained(src)
        perturb(av, 11)
    av.save_pretrained(av_dir)
    tok.save_pretrained(av_dir)
    critic = Critic(keep_norm=keep_norm)
    d = critic.value_head.in_features
    with torch.no_grad():
        critic.value_head.weight.copy_(random_head(d, d, 13, bias=False)["weight"])
    ar_dir.mkdir(parents=True)
    if ar_form == "full":
        perturb(critic.backbone, 12)
        sd = {k: v for k, v in critic.backbone.state_dict().items() if not k.startswith("lm_head")}
        critic.backbone.save_pretrained(ar_dir, state_dict=sd)
        save_file({"weight": critic.value_head.weight.detach().contiguous()}, str(ar_dir / "value_head.safetensors"))
    else:
        cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        inject_adapter_in_model(cfg, critic.backbone)
        gen = torch.Generator().manual_seed(14)
        with torch.no_grad():
            for name, p in critic.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        sd = {n: p.detach().cpu().contiguous() for n, p in critic.named_parameters()
              if "lora_" in n or n.startswith("value_head")}
        save_file(sd, str(ar_dir / "ar_lora_value_head.safetensors"))
        (ar_dir / "ar_meta.json").write_text(json.dumps({
            "ar_num_layers": K + 1, "lora_r": 4, "lora_alpha": 16, "quant": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "final_norm_stripped": not keep_norm}))
    tok.save_pretrained(ar_dir)
    meta = dataset_sidecar(tok, d)
    for sub in (av_dir, ar_dir):
        (sub / "nla_meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    return av_dir, ar_dir


def karvonen_reference(av_dir: Path, v: torch.Tensor, coef: float = 1.0, steps: int = 6) -> tuple[Any, list[int]]:
    """Their AV recipe: chat-template prompt, the add hook on layers[1] (prefill only), greedy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(av_dir)
    ids = chat_ids(tok, ACTOR.format(injection_char=CHAR))
    p = ids.index(tok.encode(CHAR, add_special_tokens=False)[0])
    if (av_dir / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path("qwen3")), str(av_dir))
        layers = model.base_model.model.model.layers
    else:
        model = AutoModelForCausalLM.from_pretrained(av_dir)
        layers = model.model.layers
    model.eval()

    def hook(module, inputs, output):  # type: ignore[no-untyped-def]
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] < 2:
            return output
        hidden = hidden.clone()
        h = hidden[0, p]
        hidden[0, p] = h + coef * h.norm() * v / (v.norm() + 1e-9)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
            gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=steps, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(ids):]
    finally:
        handle.remove()
    return logits, gen.tolist()


def critic_reference(ar_dir: Path, texts: list[str], root: Path, keep_norm: bool = False) -> torch.Tensor:
    """`critic_predict`: value_head(normalize(last hidden, √d)); prompt encoded without specials."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ar_dir)
    critic = Critic(keep_norm=keep_norm)
    if (ar_dir / "ar_lora_value_head.safetensors").exists():
        from peft import LoraConfig, inject_adapter_in_model

        meta = json.loads((ar_dir / "ar_meta.json").read_text())
        inject_adapter_in_model(LoraConfig(r=meta["lora_r"], lora_alpha=meta["lora_alpha"], use_rslora=True,
                                           target_modules=meta["target_modules"]), critic.backbone)
        # Their RL reload: the base rebuilt, the adapter injected, LoRA + head loaded non-strictly.
        _, unexpected = critic.load_state_dict(load_file(str(ar_dir / "ar_lora_value_head.safetensors")),
                                               strict=False)
        assert not unexpected
    else:
        from transformers import AutoModelForCausalLM

        critic.backbone = AutoModelForCausalLM.from_pretrained(ar_dir)
        critic.backbone.model.norm = torch.nn.Identity()
        critic.value_head.load_state_dict(load_file(str(ar_dir / "value_head.safetensors")))
    critic.eval()
    d = critic.value_head.in_features
    out = []
    for t in texts:
        h = critic.last_hidden(tok(CRITIC.format(explanation=t), add_special_tokens=False).input_ids)
        out.append(critic.value_head(h * (math.sqrt(d) / h.norm())).detach())
    return torch.stack(out)


def same_direction(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True), atol=1e-4))


def check_against_recipe(nla: NLA, av_dir: Path, ar_dir: Path, root: Path, keep_norm: bool = False) -> None:
    from transformers import AutoTokenizer

    d = nla.meta.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(5)) * 3.0
    ref_logits, ref_tokens = karvonen_reference(av_dir, v)
    tok = AutoTokenizer.from_pretrained(av_dir)
    ids = chat_ids(tok, ACTOR.format(injection_char=CHAR))
    with torch.no_grad(), nla.verbalizer.injector(v.unsqueeze(0)):
        logits = nla.av_model(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert nla.verbalizer.prompt_ids() == ids
    ours = nla.verbalize(v.unsqueeze(0), max_new_tokens=6)[0][0]
    assert ours.token_ids == ref_tokens[: len(ours.token_ids)] and ours.token_ids
    texts = ["alpha beta", "a longer explanation about code and numbers"]
    got = nla.reconstruct(texts)
    assert same_direction(got, critic_reference(ar_dir, texts, root, keep_norm))


def test_full_checkpoints_import_with_the_injection_given(tmp_path: Path) -> None:
    from nla.cli import main

    av_dir, ar_dir = write_nanonla(tmp_path)
    assert detect_layout(av_dir) == "nanonla" and detect_layout(ar_dir) == "nanonla"
    # The sidecar does not record additive injection: without it, the import stops.
    with pytest.raises(NLAError, match="--injection add"):
        import_layout(av_dir)
    nla = import_layout(ar_dir, injection="add")  # either half: the other pairs by name
    assert (nla.meta.injection.mode, nla.meta.injection.layer, nla.meta.injection.coef) == ("add", 1, 1.0)
    assert nla.meta.base_model == tiny_path("qwen3") and nla.ar.add_special_tokens is False
    check_against_recipe(nla, av_dir, ar_dir, tmp_path)
    out = tmp_path / "bundle"
    assert main(["import", str(av_dir), "--injection", "add", "--out", str(out)]) == 0
    again = NLA.from_pretrained(out)
    assert again.ar.add_special_tokens is False
    check_against_recipe(again, av_dir, ar_dir, tmp_path)


def test_lora_critic_and_adapter_av(tmp_path: Path) -> None:
    av_dir, ar_dir = write_nanonla(tmp_path, ar_form="lora")
    nla = import_layout(av_dir, injection="add")
    assert nla.meta.av_format == "peft"
    check_against_recipe(nla, av_dir, ar_dir, tmp_path)


def test_old_critic_with_final_norm_kept(tmp_path: Path) -> None:
    """Pre-2026-06 critics kept the final RMSNorm (`final_norm_stripped: false`): reproduced when
    loaded, refused as a bundle (ours stores trunks without it) rather than saved wrong."""
    av_dir, ar_dir = write_nanonla(tmp_path, ar_form="lora", keep_norm=True)
    nla = import_layout(av_dir, injection="add")
    texts = ["alpha beta", "numbers"]
    assert same_direction(nla.reconstruct(texts), critic_reference(ar_dir, texts, tmp_path, keep_norm=True))
    with pytest.raises(NLAError, match="final_norm_stripped"):
        import_layout(av_dir, tmp_path / "bundle", injection="add")


@pytest.mark.parametrize(
    ("which", "change", "message"),
    [
        ("both", lambda m: m["extraction"].pop("layer_index"), "missing field 'extraction.layer_index"),
        ("ar", lambda m: m["extraction"].update(layer_index=1), "contradictory"),
        ("av", lambda m: m["tokens"].pop("injection_token_id"), "tokens.injection_token_id"),
        ("av", lambda m: m["tokens"].update(injection_right_neighbor_id=3), "tokens.injection_right_neighbor_id"),
        ("av", lambda m: m["prompt_templates"].update(actor="{injection_char} and {question}"), "question"),
        ("av", lambda m: m.update(schema_version=9), "schema_version"),
        ("ar", lambda m: m["prompt_templates"].pop("critic"), "prompt_templates.critic"),
        ("av", lambda m: m["extraction"].update(d_model=32), "d_model"),
    ],
)
def test_bad_sidecar_names_the_field(tmp_path: Path, which: str, change, message: str) -> None:  # type: ignore[no-untyped-def]
    av_dir, ar_dir = write_nanonla(tmp_path)
    for sub in {"av": [av_dir], "ar": [ar_dir], "both": [av_dir, ar_dir]}[which]:
        path = sub / "nla_meta.yaml"
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        import_layout(av_dir, injection="add")


class _Payload:
    """Unpickling this would run code; a safe loader must refuse it."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.sentinel).write_text, ("pickle ran",))


def test_importing_never_runs_code_from_the_folder(tmp_path: Path) -> None:
    av_dir, ar_dir = write_nanonla(tmp_path)
    py_sentinel = tmp_path / "python_ran"
    for sub in (av_dir, ar_dir):
        (sub / "evil.py").write_text(
            f"from pathlib import Path\nPath({str(py_sentinel)!r}).write_text('python ran')\n"
            "from transformers import Qwen3Config, Qwen3ForCausalLM\n"
            "class EvilConfig(Qwen3Config):\n    pass\nclass EvilModel(Qwen3ForCausalLM):\n    pass\n")
        cfg_path = sub / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                           "AutoModelForCausalLM": "evil.EvilModel"}
        cfg_path.write_text(json.dumps(cfg))
    nla = import_layout(av_dir, injection="add")  # native classes, the .py is never imported
    assert type(nla.av_model).__name__ == "Qwen3ForCausalLM"
    assert not py_sentinel.exists()


def test_pickled_head_is_refused_not_run(tmp_path: Path) -> None:
    """Solshine-style `.pt` heads go through `torch.load(weights_only=True)`: a pickled object is an error."""
    from nla.interop.common import load_linear

    sentinel = tmp_path / "pickle_ran"
    path = tmp_path / "linear_head.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload(str(sentinel))}, f)
    with pytest.raises(NLAError, match=r"linear_head\.pt"):
        load_linear(path, 4, 4)
    assert not sentinel.exists()


def test_single_role_halves(tmp_path: Path) -> None:
    """Only one of the pair at hand: the AV still verbalizes (injection still required), the AR
    still reconstructs, each exactly as in the pair."""
    av_dir, ar_dir = write_nanonla(tmp_path / "pair")
    pair = import_layout(av_dir, injection="add")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    av_alone = av_dir.rename(tmp_path / "a" / av_dir.name)  # no sibling: each folder is alone
    ar_alone = ar_dir.rename(tmp_path / "b" / ar_dir.name)
    with pytest.raises(NLAError, match="--injection add"):
        import_layout(av_alone)
    av_only = import_layout(av_alone, injection="add")
    ar_only = import_layout(ar_alone)  # an AR needs no injection
    v = torch.randn(2, pair.meta.d_model, generator=torch.Generator().manual_seed(2))
    assert [o[0].token_ids for o in av_only.verbalize(v, max_new_tokens=5)] == \
        [o[0].token_ids for o in pair.verbalize(v, max_new_tokens=5)]
    texts = ["alpha beta", "numbers"]
    assert torch.allclose(ar_only.reconstruct(texts), pair.reconstruct(texts), atol=1e-5)
    with pytest.raises(NLAError, match="needs the AV"):
        ar_only.verbalize(v)
