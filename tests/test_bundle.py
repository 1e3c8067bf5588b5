"""nla.bundle: initialise, save/reload (full and LoRA), sidecar validation, the Python API."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from nla import metrics
from nla.bundle import NLA, LoraSettings, load_vectors
from nla.data.store import ActivationDataset
from nla.errors import NLAError

TEXTS = ["a loop over the items of a list", "the start of a function definition", "x"]


def _randomise_lora(nla: NLA) -> None:
    # Fresh LoRA B matrices are zero (the adapter is a no-op); make them matter.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (nla.av_model, nla.ar.trunk):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[NLA, Path]:
    nla = NLA.initialize(dataset=tiny_dataset, device="cpu")
    out = tmp_path_factory.mktemp("bundle") / "run"
    nla.save_pretrained(out)
    return nla, out


def test_initialize_from_dataset_takes_its_settings(bundle: tuple[NLA, Path], tiny_dataset: Path) -> None:
    nla, _ = bundle
    ds = ActivationDataset.open(tiny_dataset)
    assert nla.meta.base_model == "tiny:llama"
    assert nla.meta.layer_index == ds.meta.layer_index == 2
    assert nla.meta.injection.scale == pytest.approx(ds.meta.injection_scale)
    assert nla.mean_vector is not None
    torch.testing.assert_close(nla.mean_vector, ds.mean_vector())
    b = nla.baseline
    assert b is not None and b > 0
    assert nla.meta.dataset["rows"] == ds.meta.rows


def test_initialize_precedence_and_bad_settings(tiny_dataset: Path) -> None:
    # Explicit argument beats the dataset sidecar.
    nla = NLA.initialize(dataset=tiny_dataset, injection_scale=3.0, device="cpu")
    assert nla.meta.injection.scale == 3.0
    with pytest.raises(NLAError, match="extracted at layer 2, asked for layer 1"):
        NLA.initialize(dataset=tiny_dataset, layer=1, device="cpu")
    with pytest.raises(NLAError, match="d_model=64, model tiny:gpt2 has 32"):
        NLA.initialize("tiny:gpt2", dataset=tiny_dataset, layer=2, device="cpu")
    with pytest.raises(NLAError, match="injection mode"):
        NLA.initialize("tiny:gpt2", injection_mode="sideways")
    with pytest.raises(NLAError, match="inject_layer 7"):
        NLA.initialize("tiny:gpt2", injection_mode="add", inject_layer=7)
    with pytest.raises(NLAError, match="layer 4 is out of range"):
        NLA.initialize("tiny:gpt2", layer=4)


def test_sidecar_contents(bundle: tuple[NLA, Path]) -> None:
    nla, out = bundle
    data = yaml.safe_load((out / "nla_meta.yaml").read_text())
    assert data["kind"] == "nla_bundle" and data["schema_version"] == 1
    assert data["tokens"] == nla.meta.tokens.to_dict()
    assert set(data["injection"]) == {"mode", "scale", "layer", "coef"}
    assert data["prompt_templates"]["av"].count("{marker}") == 1
    assert data["dataset"]["baseline_b"] == pytest.approx(nla.baseline)
    assert (out / "ar" / "value_head.safetensors").exists()
    assert (out / "mean_vector.safetensors").exists()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_save_reload_bit_identical(kind: str, tiny_dataset: Path, tmp_path: Path) -> None:
    lora = LoraSettings(r=4) if kind == "lora" else None
    nla = NLA.initialize(dataset=tiny_dataset, lora=lora, device="cpu")
    if lora is not None:
        _randomise_lora(nla)
    with torch.no_grad():
        nla.ar.value_head.weight.copy_(torch.randn(nla.meta.d_model, nla.meta.d_model) * 0.1)
    nla.save_pretrained(tmp_path / "run")
    if lora is not None:
        # Adapters only: no full copy of the base weights in the bundle.
        assert (tmp_path / "run" / "av" / "adapter_config.json").exists()
        assert (tmp_path / "run" / "ar" / "adapter_config.json").exists()
    again = NLA.from_pretrained(tmp_path / "run", device="cpu")
    assert again.meta.to_dict() == nla.meta.to_dict()
    # The value head is re-applied after the adapter load (PEFT knows nothing of it).
    assert torch.equal(again.ar.value_head.weight, nla.ar.value_head.weight)
    nla.av_model.eval()
    nla.ar.eval()
    assert torch.equal(again.reconstruct(TEXTS), nla.reconstruct(TEXTS))
    vecs = torch.randn(2, nla.meta.d_model, generator=torch.Generator().manual_seed(0))
    a = [o[0].token_ids for o in nla.verbalize(vecs, max_new_tokens=6)]
    b = [o[0].token_ids for o in again.verbalize(vecs, max_new_tokens=6)]
    assert a == b
    # Saving over an existing bundle replaces it whole.
    again.save_pretrained(tmp_path / "run")
    assert not (tmp_path / "run.tmp").exists() and not (tmp_path / "run.old").exists()


def test_changed_head_survives_lora_reload(tmp_path: Path) -> None:
    nla = NLA.initialize("tiny:qwen2", lora=LoraSettings(r=2), device="cpu")
    before = nla.reconstruct(TEXTS)
    with torch.no_grad():
        nla.ar.value_head.weight.mul_(-2.0)
    nla.save_pretrained(tmp_path / "run")
    again = NLA.from_pretrained(tmp_path / "run")
    after = again.reconstruct(TEXTS)
    torch.testing.assert_close(after, -2.0 * before)


def _tamper(src: Path, dst: Path, edit: Any) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = yaml.safe_load((dst / "nla_meta.yaml").read_text())
    edit(data)
    (dst / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return dst


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(schema_version=99), "unknown schema_version 99"),
        (lambda d: d.pop("layer_index"), "missing field 'layer_index'"),
        (lambda d: d["tokens"].pop("right_id"), "missing field 'tokens.right_id'"),
        (lambda d: d["injection"].update(mode="multiply"), "field 'injection.mode'"),
        (lambda d: d.update(d_model="wide"), "field 'd_model' has invalid value"),
        (lambda d: d["tokens"].update(marker_id=d["tokens"]["marker_id"] + 1), "field 'tokens.marker_id'"),
        (lambda d: d["tokens"].update(left_id=d["tokens"]["left_id"] + 1), "field 'tokens.left_id'"),
        (lambda d: d["tokens"].update(right_id=d["tokens"]["right_id"] + 1), "field 'tokens.right_id'"),
    ],
)
def test_sidecar_validation(bundle: tuple[NLA, Path], tmp_path: Path, edit: Any, match: str) -> None:
    _, out = bundle
    bad = _tamper(out, tmp_path / "bad", edit)
    with pytest.raises(NLAError, match=match):
        NLA.from_pretrained(bad)


def test_wrong_kind_is_refused(bundle: tuple[NLA, Path], tmp_path: Path) -> None:
    _, out = bundle
    bad = _tamper(out, tmp_path / "bad", lambda d: d.update(kind="nla_dataset"))
    with pytest.raises(NLAError):
        NLA.from_pretrained(bad)
    with pytest.raises(NLAError, match="field 'kind'"):
        from nla.bundle import BundleMeta

        BundleMeta.from_dict({"kind": "nla_dataset"}, "x.yaml")


def test_missing_parts(bundle: tuple[NLA, Path], tmp_path: Path) -> None:
    import shutil

    _, out = bundle
    with pytest.raises(NLAError, match=r"nowhere.* is not a folder"):
        NLA.from_pretrained(tmp_path / "nowhere")
    shutil.copytree(out, tmp_path / "nohead")
    (tmp_path / "nohead" / "ar" / "value_head.safetensors").unlink()
    with pytest.raises(NLAError, match=r"missing value_head\.safetensors"):
        NLA.from_pretrained(tmp_path / "nohead")


def test_dtype_and_device_options(bundle: tuple[NLA, Path]) -> None:
    nla, out = bundle
    half = NLA.from_pretrained(out, dtype="bfloat16", device="cpu")
    assert next(half.av_model.parameters()).dtype == torch.bfloat16
    assert next(half.ar.trunk.parameters()).dtype == torch.bfloat16
    assert half.ar.value_head.weight.dtype == torch.float32  # the head stays fp32
    assert half.device == torch.device("cpu")
    recon = half.reconstruct(TEXTS)
    assert recon.dtype == torch.float32 and bool(torch.isfinite(recon).all())
    # bf16 reads the same direction as fp32, up to bf16 rounding.
    assert float(metrics.cosine(recon, nla.reconstruct(TEXTS)).min()) > 0.98
    with pytest.raises(NLAError, match="unknown dtype"):
        NLA.from_pretrained(out, dtype="float7")


def test_api_round_trip_explain_and_steering(bundle: tuple[NLA, Path]) -> None:
    nla, _ = bundle
    text = "The for statement is used to iterate over the elements of a sequence."
    ids, states = nla.base_states(text)
    with torch.no_grad():
        plain = nla.av_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(states, plain.hidden_states[nla.meta.layer_index + 1][0], rtol=1e-5, atol=1e-5)

    rows = nla.explain(text, positions=[3, -1], max_new_tokens=6)
    assert [r["position"] for r in rows] == [3, len(ids) - 1]
    assert {"token", "context", "explanation", "raw", "mse_nrm", "cosine", "fve_nrm"} <= set(rows[0])
    with pytest.raises(NLAError, match="out of range"):
        nla.explain(text, positions=[len(ids)])

    trip = nla.round_trip(states[[3, len(ids) - 1]], max_new_tokens=6)
    assert trip.reconstructions.shape == (2, nla.meta.d_model)
    assert [r["mse_nrm"] for r in trip.per_vector] == pytest.approx([r["mse_nrm"] for r in rows])
    texts = [e if e is not None else raw for e, raw in zip(trip.explanations, trip.raw)]
    torch.testing.assert_close(trip.reconstructions, nla.reconstruct(texts))
    assert trip.metrics["fve_nrm"] == pytest.approx(
        metrics.fve_nrm(trip.reconstructions, states[[3, len(ids) - 1]], nla.mean_vector, nla.baseline), abs=1e-6)

    # An arbitrary direction (a steering vector: the difference of two states) verbalizes, and
    # under replace only its direction matters.
    steer = states[-1] - states[3]
    small = nla.verbalize(steer * 1e-3, max_new_tokens=6)[0][0]
    large = nla.verbalize(steer * 1e3, max_new_tokens=6)[0][0]
    assert small.token_ids == large.token_ids
    with pytest.raises(NLAError, match="all zeros"):
        nla.verbalize(torch.zeros(nla.meta.d_model))
    with pytest.raises(NLAError, match="does not match"):
        nla.verbalize(torch.ones(3, nla.meta.d_model + 1))


def test_base_states_with_lora_use_the_adapter_free_model() -> None:
    nla = NLA.initialize("tiny:gemma", lora=LoraSettings(r=2), device="cpu")
    _randomise_lora(nla)
    text = "Sequences may be indexed."
    ids, states = nla.base_states(text)
    from nla.models.loading import load_model

    base, _ = load_model("tiny:gemma", device="cpu")
    with torch.no_grad():
        plain = base(input_ids=torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(states, plain.hidden_states[nla.meta.layer_index + 1][0], rtol=1e-5, atol=1e-5)


def test_load_vectors_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    v = torch.randn(3, 8)
    save_file({"vectors": v}, str(tmp_path / "v.safetensors"))
    np.save(tmp_path / "v.npy", v.numpy())
    torch.save(v, tmp_path / "v.pt")
    torch.save({"steer": v[0]}, tmp_path / "d.pt")
    for name in ("v.safetensors", "v.npy", "v.pt"):
        assert torch.equal(load_vectors(tmp_path / name), v)
    assert load_vectors(tmp_path / "d.pt").shape == (1, 8)  # a single [d] direction


class Payload:
    """Stands in for any pickled object: weights_only loading must never run its code."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_load_vectors_refuses_pickles_and_junk(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(NLAError, match="cannot read vectors"):
        load_vectors(tmp_path / "evil.pt")
    torch.save({"a": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(NLAError, match="expected a tensor"):
        load_vectors(tmp_path / "list.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(NLAError, match="cannot read vectors"):
        load_vectors(tmp_path / "obj.npy")
    (tmp_path / "v.csv").write_text("1,2,3")
    with pytest.raises(NLAError, match="unsupported vector file"):
        load_vectors(tmp_path / "v.csv")
    with pytest.raises(NLAError, match="file not found"):
        load_vectors(tmp_path / "missing.npy")


def test_merge_adapters_keeps_outputs_and_saves_full(tiny_dataset: Path, tmp_path: Path) -> None:
    nla = NLA.initialize(dataset=tiny_dataset, lora=LoraSettings(r=4), device="cpu")
    _randomise_lora(nla)
    nla.av_model.eval()
    nla.ar.eval()
    vecs = torch.randn(3, nla.meta.d_model, generator=torch.Generator().manual_seed(1))
    before_text = [o[0].token_ids for o in nla.verbalize(vecs, max_new_tokens=8)]
    before_vec = nla.reconstruct(TEXTS)
    nla.merge_adapters()
    assert (nla.meta.av_format, nla.meta.ar_format) == ("full", "full")
    assert not any("lora" in name for name, _ in nla.av_model.named_parameters())
    assert [o[0].token_ids for o in nla.verbalize(vecs, max_new_tokens=8)] == before_text
    torch.testing.assert_close(nla.reconstruct(TEXTS), before_vec, rtol=1e-4, atol=1e-4)
    nla.merge_adapters()  # a second call has nothing left to merge
    nla.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "av" / "adapter_config.json").exists()
    again = NLA.from_pretrained(tmp_path / "merged", device="cpu")
    torch.testing.assert_close(again.reconstruct(TEXTS), before_vec, rtol=1e-4, atol=1e-4)


def test_lora_bundle_holds_the_frozen_base_once(tiny_dataset: Path, tmp_path: Path) -> None:
    from nla.models.sharing import unique_parameter_bytes

    nla = NLA.initialize(dataset=tiny_dataset, lora=LoraSettings(r=4), device="cpu")
    _randomise_lora(nla)
    nla.av_model.eval()
    nla.ar.eval()
    av_emb = nla.av_model.get_input_embeddings().weight
    assert nla.ar.trunk.get_input_embeddings().weight is av_emb
    av_bytes = unique_parameter_bytes(nla.av_model)
    head = nla.ar.value_head.weight
    extra = unique_parameter_bytes(nla.av_model, nla.ar) - av_bytes
    lora_ar = sum(p.numel() * p.element_size() for n, p in nla.ar.trunk.named_parameters() if "lora_" in n)
    # Beyond the AV, the AR holds its adapter and value head and nothing else.
    assert extra == lora_ar + head.numel() * head.element_size()
    shared_vec = nla.reconstruct(TEXTS)
    vecs = torch.randn(2, nla.meta.d_model, generator=torch.Generator().manual_seed(3))
    shared_text = [o[0].token_ids for o in nla.verbalize(vecs, max_new_tokens=6)]

    # A step on the AR's trainable parameters leaves the AV as it was.
    nla.ar.train()
    opt = torch.optim.SGD([p for p in nla.ar.parameters() if p.requires_grad], lr=0.5)
    ids, mask = nla.ar.encode(TEXTS)
    nla.ar(ids, mask).pow(2).mean().backward()
    opt.step()
    nla.ar.eval()
    assert [o[0].token_ids for o in nla.verbalize(vecs, max_new_tokens=6)] == shared_text
    assert nla.ar.trunk.get_input_embeddings().weight is av_emb

    # Unsharing copies, changes no output, and a saved bundle shares again on load.
    after_step = nla.reconstruct(TEXTS)
    assert not torch.equal(after_step, shared_vec)
    nla.unshare_frozen_base()
    assert nla.ar.trunk.get_input_embeddings().weight is not av_emb
    assert torch.equal(nla.reconstruct(TEXTS), after_step)
    assert unique_parameter_bytes(nla.av_model, nla.ar) - av_bytes > extra
    nla.save_pretrained(tmp_path / "run")
    again = NLA.from_pretrained(tmp_path / "run", device="cpu")
    assert again.ar.trunk.get_input_embeddings().weight is again.av_model.get_input_embeddings().weight
    assert torch.equal(again.reconstruct(TEXTS), after_step)


def test_full_bundles_share_nothing(tiny_dataset: Path) -> None:
    nla = NLA.initialize(dataset=tiny_dataset, device="cpu")
    assert nla.share_frozen_base() == 0
    assert nla.ar.trunk.get_input_embeddings().weight is not nla.av_model.get_input_embeddings().weight
