"""nanoNLA-style merged checkpoints (additive injection at block 1), from a tiny Qwen3; and the
rule that importing never runs code from the folder."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_interop_reference import (
    apply_head,
    chat_ids,
    marker_neighbours,
    perturb,
    random_head,
    tiny_path,
)

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop import detect_layout, import_layout

K = 2
INJECT_LAYER = 1
COEF = 0.5
CHAR = chr(0x3222)
AV_TEMPLATE = "Activation: <concept>{marker}</concept>\nDescribe it."
AR_TEMPLATE = "{explanation}\nVector:"


def write_nanonla(root: Path, *, with_neighbours: bool = True) -> Path:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = tiny_path("qwen3")
    tok = AutoTokenizer.from_pretrained(src)
    av = AutoModelForCausalLM.from_pretrained(src)
    perturb(av, 11)
    av.to(torch.bfloat16).save_pretrained(root / "av")  # merged bf16 weights
    tok.save_pretrained(root / "av")
    ar = AutoModel.from_pretrained(src)  # full depth: the importer cuts it after block K
    perturb(ar, 12)
    ar.to(torch.bfloat16).save_pretrained(root / "ar")
    d = av.config.hidden_size
    save_file(random_head(d, d, 13, bias=True), str(root / "ar" / "value_head.safetensors"))
    marker_id = tok.encode(CHAR, add_special_tokens=False)[0]
    _, left, right = marker_neighbours(tok, AV_TEMPLATE.replace("{marker}", CHAR), marker_id)
    marker = {"text": CHAR, "token_id": marker_id}
    if with_neighbours:
        marker.update(left_id=left, right_id=right)
    meta = {"format": "nanonla", "version": 1, "base_model": "tiny:qwen3", "d_model": d, "layer": K,
            "injection": {"type": "additive", "layer": INJECT_LAYER, "coef": COEF}, "marker": marker,
            "prompts": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE}, "mse_scale": "sqrt_d_model"}
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    return root


def reference_check(nla: NLA, root: Path) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "av")
    d = nla.meta.d_model
    ids = chat_ids(tok, AV_TEMPLATE.replace("{marker}", CHAR))
    p = ids.index(tok.encode(CHAR, add_special_tokens=False)[0])
    v = torch.randn(d, generator=torch.Generator().manual_seed(5)) * 3.0
    av = AutoModelForCausalLM.from_pretrained(root / "av", dtype=torch.float32).eval()
    before: list[torch.Tensor] = []

    def karvonen(module, inputs, output):  # type: ignore[no-untyped-def]
        # nanoNLA's recipe: h_p <- h_p + coef * ||h_p|| * v / ||v|| at block `layer`'s output.
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        h = hidden[0, p].float()
        before.append(h.clone())
        hidden[0, p] = h + COEF * h.norm() * v / v.norm()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = av.model.layers[INJECT_LAYER].register_forward_hook(karvonen)
    with torch.no_grad():
        ref_logits = av(input_ids=torch.tensor([ids])).logits
    handle.remove()

    # Ours: capture block INJECT_LAYER's output after our injector changed it.
    from nla.models.layers import decoder_blocks

    after: list[torch.Tensor] = []
    with torch.no_grad(), nla.verbalizer.injector(v.unsqueeze(0)):
        block = decoder_blocks(nla.av_model)[INJECT_LAYER]
        h2 = block.register_forward_hook(lambda m, i, o: after.append((o[0] if isinstance(o, tuple) else o)[0, p].clone()))
        try:
            logits = nla.av_model(input_ids=torch.tensor([ids])).logits
        finally:
            h2.remove()
    expected = before[0] + COEF * before[0].norm() * v / v.norm()
    assert torch.allclose(after[0].float(), expected, atol=1e-5)  # same position, same added norm
    assert torch.allclose(logits, ref_logits, atol=1e-5)

    ar = AutoModel.from_pretrained(root / "ar", dtype=torch.float32).eval()
    from safetensors.torch import load_file

    head = load_file(str(root / "ar" / "value_head.safetensors"))
    texts = ["alpha beta", "a longer explanation about code"]
    expected_r = []
    for t in texts:
        ids_ar = tok(AR_TEMPLATE.format(explanation=t), add_special_tokens=True).input_ids
        with torch.no_grad():
            hs = ar(input_ids=torch.tensor([ids_ar]), output_hidden_states=True).hidden_states
        expected_r.append(apply_head(head, hs[K + 1][0, -1].float()))  # block K, before any final norm
    assert torch.allclose(nla.reconstruct(texts), torch.stack(expected_r), atol=1e-4)


@pytest.mark.parametrize("with_neighbours", [True, False])
def test_nanonla_matches_additive_recipe(tmp_path: Path, with_neighbours: bool) -> None:
    root = write_nanonla(tmp_path / "ckpt", with_neighbours=with_neighbours)
    assert detect_layout(root) == "nanonla"
    nla = NLA.from_pretrained(root)
    assert (nla.meta.injection.mode, nla.meta.injection.layer, nla.meta.injection.coef) == ("add", INJECT_LAYER, COEF)
    assert nla.meta.mse_scale == pytest.approx(math.sqrt(nla.meta.d_model))
    reference_check(nla, root)
    out = tmp_path / "bundle"
    import_layout(root, out)
    reference_check(NLA.from_pretrained(out), root)  # bias of the value head survives the bundle


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("layer"), "'layer'"),
        (lambda m: m["injection"].update(type="replace"), "injection.type"),
        (lambda m: m["marker"].pop("token_id"), "marker.token_id"),
        (lambda m: m["marker"].update(right_id=3), "tokens.right_id"),
        (lambda m: m.update(d_model=32), "d_model"),
        (lambda m: m["prompts"].update(av="{marker} and {question}"), "question"),
        (lambda m: m.update(version=9), "version"),
        (lambda m: m.update(layer=7), "'layer'"),
    ],
)
def test_bad_sidecar_names_the_field(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    root = write_nanonla(tmp_path / "ckpt")
    data = yaml.safe_load((root / "nla_meta.yaml").read_text())
    change(data)
    (root / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(NLAError, match=message):
        import_layout(root)


class _Payload:
    """Unpickling this would run code; a safe loader must refuse it."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.sentinel).write_text, ("pickle ran",))


def test_importing_never_runs_code_from_the_folder(tmp_path: Path) -> None:
    root = write_nanonla(tmp_path / "ckpt")
    py_sentinel = tmp_path / "python_ran"
    pickle_sentinel = tmp_path / "pickle_ran"
    # A remote-code model class that would leave a file behind if it were ever imported.
    for sub in ("av", "ar"):
        (root / sub / "evil.py").write_text(
            f"from pathlib import Path\nPath({str(py_sentinel)!r}).write_text('python ran')\n"
            "from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model\n"
            "class EvilConfig(Qwen3Config):\n    pass\nclass EvilModel(Qwen3ForCausalLM):\n    pass\n"
        )
        cfg_path = root / sub / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                           "AutoModelForCausalLM": "evil.EvilModel"}
        cfg_path.write_text(json.dumps(cfg))
    tok_cfg = root / "av" / "tokenizer_config.json"
    tc = json.loads(tok_cfg.read_text())
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    tok_cfg.write_text(json.dumps(tc))
    nla = import_layout(root)  # native classes are used, the .py is never imported
    assert type(nla.av_model).__name__ == "Qwen3ForCausalLM"
    assert not py_sentinel.exists()
    # A value head that is a pickled object rather than tensors: refused, not executed.
    (root / "ar" / "value_head.safetensors").unlink()
    with open(root / "ar" / "value_head.pt", "wb") as f:
        pickle.dump({"weight": _Payload(str(pickle_sentinel))}, f)
    with pytest.raises(NLAError, match=r"value_head\.pt"):
        import_layout(root)
    assert not pickle_sentinel.exists()
    assert not py_sentinel.exists()
