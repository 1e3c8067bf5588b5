"""The paper's AV/AR checkpoint pairs, from a tiny Qwen2.

Two writers of kitft/natural_language_autoencoders are copied: the release sidecars
(`kitft/nla-...-av` / `-ar`, read by its `nla_inference.py`) and the training-side sidecars of
`nla/config.py` `write_model_sidecar` (role actor/critic, `base_checkpoint`, `stage`,
`prompt_templates.actor/critic`, `critic.extraction_layer_index`, or `critic.num_hidden_layers`
in schema 1). The reference recipe is `nla_inference.py` (`NLAClient._build_embeds`,
`NLACritic.reconstruct`), re-implemented with plain transformers calls.
"""

from __future__ import annotations

import dataclasses
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
    marker_neighbours,
    perturb,
    random_head,
    replace_embeds,
    tiny_path,
)

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

K = 2
AV_TEMPLATE = "Here is a thought: <concept>{injection_char}</concept>\nExplain it in {{braces}}."
AR_TEMPLATE = "Explanation:\n{explanation}\nThe thought:"
CHAR = chr(0x3221)


def write_pair(root: Path, *, old_names: bool = False) -> tuple[Path, Path]:
    """Exactly the released layout: two full HF folders, each with its own nla_meta.yaml."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = tiny_path("qwen2")
    tok = AutoTokenizer.from_pretrained(src)
    av_dir, ar_dir = root / "nla-tiny-L2-av", root / "nla-tiny-L2-ar"
    av = AutoModelForCausalLM.from_pretrained(src)
    perturb(av, 1)
    av.save_pretrained(av_dir)
    tok.save_pretrained(av_dir)
    d = av.config.hidden_size
    # AR: the base cut to K + 1 blocks, no final norm, saved as a bare (headless) model.
    ar = AutoModel.from_pretrained(src)
    del ar.layers[K + 1:]
    ar.config.num_hidden_layers = K + 1
    if isinstance(getattr(ar.config, "layer_types", None), list):
        ar.config.layer_types = ar.config.layer_types[: K + 1]
    ar.norm = torch.nn.Identity()
    perturb(ar, 2)
    ar.save_pretrained(ar_dir)
    tok.save_pretrained(ar_dir)
    head = random_head(d, d, 3, bias=False)
    save_file({"weight": head["weight"].to(torch.bfloat16)}, str(ar_dir / "value_head.safetensors"))

    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    _, left, right = marker_neighbours(tok, AV_TEMPLATE.format(injection_char=CHAR), marker_id)
    suffix = tok(AR_TEMPLATE.format(explanation="x"), add_special_tokens=True).input_ids[-3:]
    tokens = {"injection_char": CHAR, "injection_token_id": marker_id, "injection_left_neighbor_id": left,
              "injection_right_neighbor_id": right}
    templates = {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE} if old_names else {"av": AV_TEMPLATE, "ar": AR_TEMPLATE}
    common = {"kind": "nla_model", "schema_version": 2, "d_model": d}
    av_meta = {**common, "extraction_layer_index": K,
               "extraction": {"injection_scale": "sqrt_d_model", "mse_scale": "sqrt_d_model"},
               "tokens": tokens, "prompt_templates": templates}
    ar_meta = {**common, "critic": {"extraction_layer_index": K}, "extraction": {"mse_scale": math.sqrt(d)},
               "tokens": {**tokens, "critic_suffix_ids": suffix},
               "prompt_templates": {"critic": AR_TEMPLATE} if old_names else {"ar": AR_TEMPLATE}}
    if not old_names:
        av_meta["role"], ar_meta["role"] = "av", "ar"
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(av_meta, allow_unicode=True))
    (ar_dir / "nla_meta.yaml").write_text(yaml.safe_dump(ar_meta, allow_unicode=True))
    return av_dir, ar_dir


def reference_check(nla: NLA, av_dir: Path, ar_dir: Path) -> None:
    """Compare with the released recipe, re-implemented with plain transformers calls."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(av_dir)
    meta = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    d = meta["d_model"]
    templates = meta["prompt_templates"]
    content = templates.get("av", templates.get("actor")).format(injection_char=meta["tokens"]["injection_char"])
    ids = chat_ids(tok, content)
    p = ids.index(meta["tokens"]["injection_token_id"])
    v = torch.randn(d, generator=torch.Generator().manual_seed(7)) * 13.0
    av = AutoModelForCausalLM.from_pretrained(av_dir).eval()
    ref_emb = replace_embeds(av, ids, p, v, math.sqrt(d))
    with torch.no_grad():
        ref_logits = av(inputs_embeds=ref_emb).logits
    ours_emb, ours_logits = captured_embeddings(nla, ids, v.unsqueeze(0))
    assert torch.allclose(ours_emb, ref_emb, atol=1e-6)  # same position, same scale
    assert abs(float(ours_emb[0, p].norm()) - math.sqrt(d)) < 1e-3
    assert torch.allclose(ours_logits, ref_logits, atol=1e-5)
    # Greedy generation through inputs_embeds (how the paper's client runs the AV).
    with torch.no_grad():
        ref_gen = av.generate(inputs_embeds=ref_emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()
    ours = nla.verbalize(v.unsqueeze(0), max_new_tokens=6)[0][0]
    assert ours.token_ids and ref_gen[: len(ours.token_ids)] == ours.token_ids

    ar = AutoModel.from_pretrained(ar_dir).eval()
    ar.norm = torch.nn.Identity()
    head = load_file(str(ar_dir / "value_head.safetensors"))
    ar_tmpl = yaml.safe_load((ar_dir / "nla_meta.yaml").read_text())["prompt_templates"]
    ar_tmpl = ar_tmpl.get("ar", ar_tmpl.get("critic"))
    texts = ["a cat sits on a mat", "numbers and code"]
    expected = []
    for t in texts:
        ids_ar = tok(ar_tmpl.format(explanation=t), add_special_tokens=True).input_ids
        with torch.no_grad():
            hidden = ar(input_ids=torch.tensor([ids_ar])).last_hidden_state[0, -1].float()
        expected.append(apply_head(head, hidden))
    assert torch.allclose(nla.reconstruct(texts), torch.stack(expected), atol=1e-4)


@pytest.mark.parametrize("old_names", [False, True])
def test_paper_pair_matches_released_recipe(tmp_path: Path, old_names: bool) -> None:
    av_dir, ar_dir = write_pair(tmp_path, old_names=old_names)
    assert detect_layout(av_dir) == "paper"
    nla = NLA.from_pretrained(av_dir)  # the AR sibling (-ar) is found by name
    assert nla.meta.injection.mode == "replace"
    assert nla.meta.injection.scale == pytest.approx(math.sqrt(nla.meta.d_model))
    assert nla.meta.layer_index == K
    assert "{marker}" in nla.meta.prompt_templates["av"] and "{braces}" in nla.meta.prompt_templates["av"]
    reference_check(nla, av_dir, ar_dir)


def test_import_cli_writes_an_equivalent_bundle(tmp_path: Path) -> None:
    from nla.cli import main

    av_dir, ar_dir = write_pair(tmp_path / "src")
    out = tmp_path / "bundle"
    assert main(["import", str(av_dir), "--ar", str(ar_dir), "--out", str(out)]) == 0
    data = yaml.safe_load((out / "nla_meta.yaml").read_text())
    assert data["kind"] == "nla_bundle" and data["layer_index"] == K
    reference_check(NLA.from_pretrained(out), av_dir, ar_dir)


def test_pair_folder_with_av_and_ar_subfolders(tmp_path: Path) -> None:
    av_dir, ar_dir = write_pair(tmp_path)
    av_dir.rename(tmp_path / "av")
    ar_dir.rename(tmp_path / "ar")
    assert detect_layout(tmp_path) == "paper"
    nla = import_layout(tmp_path)
    assert nla.meta.d_model == 48


def _edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True))


@pytest.mark.parametrize(
    ("which", "change", "message"),
    [
        ("av", lambda m: m["tokens"].pop("injection_right_neighbor_id"), "tokens.injection_right_neighbor_id"),
        ("av", lambda m: m["extraction"].pop("injection_scale"), "extraction.injection_scale"),
        ("ar", lambda m: m["critic"].update(extraction_layer_index=1), "contradictory"),
        ("ar", lambda m: m.update(d_model=64), "d_model"),
        ("av", lambda m: m["tokens"].update(injection_token_id=5), "tokens.injection_token_id"),
        ("av", lambda m: m["tokens"].update(injection_left_neighbor_id=5), "tokens.injection_left_neighbor_id"),
        ("av", lambda m: m.update(schema_version=3), "schema_version"),
        ("av", lambda m: m.update(role="verbalizer"), "role"),
        ("av", lambda m: m["extraction"].update(injection_scale=None), "extraction.injection_scale"),
        ("av", lambda m: m["prompt_templates"].update(actor="other {injection_char}"), "prompt_templates"),
        ("av", lambda m: m["prompt_templates"].update(av="no placeholder"), "injection_char"),
        ("ar", lambda m: m["tokens"].update(critic_suffix_ids=[1, 2, 3]), "tokens.critic_suffix_ids"),
        ("av", lambda m: m["extraction"].update(injection_scale="big"), "extraction.injection_scale"),
    ],
)
def test_bad_sidecar_names_the_field(tmp_path: Path, which: str, change, message: str) -> None:  # type: ignore[no-untyped-def]
    av_dir, ar_dir = write_pair(tmp_path)
    _edit((av_dir if which == "av" else ar_dir) / "nla_meta.yaml", change)
    with pytest.raises(NLAError, match=message.replace(".", r"\.")):
        import_layout(av_dir, ar=ar_dir)


def test_the_loader_returns_parts_and_the_nla_builds_itself(tmp_path: Path) -> None:
    """Issue 16 item 6: a layout's loader builds nothing; ``NLA.from_parts`` checks the sidecar's
    marker against the live tokenizer (naming the field as the paper spells it) and builds."""
    from nla.interop import load_parts
    from nla.parts import NLAParts

    av_dir, ar_dir = write_pair(tmp_path)
    root, parts = load_parts(av_dir, ar=ar_dir)
    assert root == av_dir and isinstance(parts, NLAParts) and parts.role is None and not parts.share_base
    assert parts.head is not None and tuple(parts.head.weight.shape) == (48, 48)
    nla = NLA.from_parts(parts)
    reference_check(nla, av_dir, ar_dir)
    _, bad = load_parts(av_dir, ar=ar_dir)
    bad.meta.tokens = dataclasses.replace(bad.meta.tokens, right_id=bad.meta.tokens.right_id + 1)  # contradicted
    with pytest.raises(NLAError, match=r"tokens\.injection_right_neighbor_id"):
        NLA.from_parts(bad)
    _, bad = load_parts(av_dir, ar=ar_dir)
    bad.meta.d_model = 64
    with pytest.raises(NLAError, match="field 'd_model' is 64"):
        NLA.from_parts(bad)


def test_wrong_ar_depth_is_an_off_by_one_error(tmp_path: Path) -> None:
    av_dir, ar_dir = write_pair(tmp_path)
    for path in (av_dir, ar_dir):
        _edit(path / "nla_meta.yaml", lambda m: m.update(extraction_layer_index=1)
              if "extraction_layer_index" in m else m["critic"].update(extraction_layer_index=1))
    with pytest.raises(NLAError, match="num_hidden_layers=3"):
        import_layout(av_dir, ar=ar_dir)


def test_half_without_partner_says_how_to_pass_it(tmp_path: Path) -> None:
    av_dir, ar_dir = write_pair(tmp_path)
    lone = ar_dir.rename(tmp_path / "elsewhere")
    av_only = NLA.from_pretrained(av_dir)  # loads alone; what needs the AR says how to add it
    with pytest.raises(NLAError, match="--ar"):
        av_only.reconstruct(["x"])
    assert import_layout(av_dir, ar=lone).meta.layer_index == K


def test_single_role_folders_still_verbalize_or_reconstruct(tmp_path: Path) -> None:
    """An AV-only or AR-only release: the half that is there works exactly as in the pair, and
    a half bundle written from it reads back."""
    from nla.bundle import SingleRoleNLA

    av_dir, ar_dir = write_pair(tmp_path / "pair")
    pair = import_layout(av_dir)
    (tmp_path / "solo").mkdir()
    av_alone = av_dir.rename(tmp_path / "solo" / "nla-tiny-L2-av")
    ar_alone = ar_dir.rename(tmp_path / "nla-tiny-L2-ar")
    av_only = import_layout(av_alone, tmp_path / "av-bundle")
    ar_only = import_layout(ar_alone, tmp_path / "ar-bundle")
    assert isinstance(av_only, SingleRoleNLA) and (av_only.role, ar_only.role) == ("av", "ar")
    v = torch.randn(2, 48, generator=torch.Generator().manual_seed(1))
    expected = [o[0].token_ids for o in pair.verbalize(v, max_new_tokens=5)]
    texts = ["a cat sits on a mat", "numbers"]
    for half in (av_only, NLA.from_pretrained(tmp_path / "av-bundle")):
        assert [o[0].token_ids for o in half.verbalize(v, max_new_tokens=5)] == expected
        with pytest.raises(NLAError, match="needs the AR"):
            half.round_trip(v)
    for half in (ar_only, NLA.from_pretrained(tmp_path / "ar-bundle")):
        assert torch.allclose(half.reconstruct(texts), pair.reconstruct(texts), atol=1e-5)
        with pytest.raises(NLAError, match="needs the AV"):
            half.verbalize(v)


def write_training_pair(root: Path, *, schema: int = 2) -> tuple[Path, Path]:
    """The training-side files: `write_model_sidecar` sidecars next to FSDP-exported HF folders.

    The critic is saved the way their `NLACriticModel.save_pretrained` does: the causal-LM
    backbone cut to K + 1 blocks (lm_head and final norm replaced by Identity) plus
    `value_head.safetensors`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    av_dir, ar_dir = write_pair(root)
    src = tiny_path("qwen2")
    tok = AutoTokenizer.from_pretrained(src)
    critic = AutoModelForCausalLM.from_pretrained(src)
    del critic.model.layers[K + 1:]
    critic.config.num_hidden_layers = K + 1
    if isinstance(getattr(critic.config, "layer_types", None), list):
        critic.config.layer_types = critic.config.layer_types[: K + 1]
    critic.model.norm = torch.nn.Identity()
    perturb(critic, 2)
    for f in ar_dir.glob("*.safetensors"):
        if f.name != "value_head.safetensors":
            f.unlink()
    critic.save_pretrained(ar_dir)
    av_old = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    ar_old = yaml.safe_load((ar_dir / "nla_meta.yaml").read_text())
    d = av_old["d_model"]
    tokens = {**av_old["tokens"], "critic_suffix_ids": ar_old["tokens"]["critic_suffix_ids"]}
    templates = {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE}
    layer_block = {"extraction_layer_index": K} if schema == 2 else {"num_hidden_layers": K}

    def sidecar(role: str, inj: float | None) -> dict:
        meta = {"kind": "nla_model", "role": role, "stage": "rl", "base_checkpoint": src, "d_model": d,
                "extraction": {"injection_scale": inj, "mse_scale": math.sqrt(d)}, "tokens": tokens,
                "prompt_templates": templates, "trained_on": ["rl.parquet"], "parent_checkpoints": [],
                "created_at": "2026-01-01T00:00:00+00:00", "created_by": "test", "critic": layer_block,
                "training": {"rollout_id": 3, "lr": 1e-6}}
        if schema == 2:
            meta = {"kind": "nla_model", "schema_version": 2, **{k: v for k, v in meta.items() if k != "kind"}}
        return meta

    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(sidecar("actor", math.sqrt(d)), allow_unicode=True))
    (ar_dir / "nla_meta.yaml").write_text(yaml.safe_dump(sidecar("critic", None), allow_unicode=True))
    tok.save_pretrained(ar_dir)
    return av_dir, ar_dir


@pytest.mark.parametrize("schema", [1, 2])
def test_training_sidecars_import_and_record_the_base(tmp_path: Path, schema: int) -> None:
    from nla.cli import main

    av_dir, ar_dir = write_training_pair(tmp_path / "src", schema=schema)
    out = tmp_path / "bundle"
    assert main(["import", str(av_dir), "--out", str(out)]) == 0  # the -ar sibling pairs by name
    nla = NLA.from_pretrained(out)
    assert nla.meta.base_model == tiny_path("qwen2")  # base_checkpoint, not the AV folder
    assert nla.meta.layer_index == K
    reference_check(nla, av_dir, ar_dir)


def test_explain_reads_activations_from_the_base_model(tmp_path: Path) -> None:
    """A fine-tuned AV is not the base: explain() must use `base_checkpoint`'s block-K states."""
    from transformers import AutoModelForCausalLM

    av_dir, _ = write_training_pair(tmp_path)
    nla = import_layout(av_dir)
    text = "the cat sat on the mat"
    ids, states = nla.base_states(text)

    def block_k(path: str | Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[K + 1][0].float()

    assert torch.allclose(states, block_k(tiny_path("qwen2")), atol=1e-5)
    assert not torch.allclose(states, block_k(av_dir), atol=1e-3)


def test_release_without_a_base_refuses_explain_and_names_the_fix(tmp_path: Path) -> None:
    av_dir, _ = write_pair(tmp_path)
    nla = import_layout(av_dir)
    assert nla.meta.base_model == ""
    with pytest.raises(NLAError, match="--base-model"):
        nla.explain("some text")
    assert import_layout(av_dir, base_model="tiny:qwen2").meta.base_model == "tiny:qwen2"


def test_a_400_token_explanation_is_read_whole_like_the_paper_critic(tmp_path: Path) -> None:
    """`NLACritic.reconstruct` tokenizes the whole templated text; nothing is cut in the middle."""
    from transformers import AutoModel, AutoTokenizer

    av_dir, ar_dir = write_pair(tmp_path)
    nla = import_layout(av_dir)
    tok = AutoTokenizer.from_pretrained(ar_dir)
    words = " ".join(f"w{i % 37} and" for i in range(400))
    explanation = tok.decode(tok(words, add_special_tokens=False).input_ids[:400])
    ids = tok(AR_TEMPLATE.format(explanation=explanation), add_special_tokens=True).input_ids
    assert len(ids) > 400
    assert nla.ar.token_ids(explanation) == ids
    ar = AutoModel.from_pretrained(ar_dir).eval()
    ar.norm = torch.nn.Identity()
    with torch.no_grad():
        hidden = ar(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].float()
    expected = apply_head(load_file(str(ar_dir / "value_head.safetensors")), hidden)
    assert torch.allclose(nla.reconstruct([explanation])[0], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda av, ar: _edit(ar / "nla_meta.yaml", lambda m: m["critic"].update(extraction_layer_index=1)),
         "contradictory fields: critic.extraction_layer_index (AR)=1"),
        (lambda av, ar: _edit(av / "nla_meta.yaml", lambda m: m["tokens"].pop("injection_char")),
         "missing field 'tokens.injection_char'"),
        (lambda av, ar: (ar / "config.json").unlink(), "no config.json"),
    ],
)
def test_cli_unmappable_folder_fails_in_one_line(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    """`nla import` on a folder that cannot be mapped: exit status != 0, one stderr line naming
    the field, no traceback (the real CLI in a subprocess)."""
    import subprocess
    import sys

    av_dir, ar_dir = write_pair(tmp_path)
    change(av_dir, ar_dir)
    proc = subprocess.run([sys.executable, "-m", "nla.cli", "import", str(av_dir), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
