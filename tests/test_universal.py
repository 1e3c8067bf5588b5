"""Universal adapters (docs/design.md §9) on tiny random models of three widths: llama 64 (anchor), qwen2 48, gpt2 32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from nla.cli import main
from nla.data.store import ActivationDataset
from nla.errors import NLAError
from nla.universal.cli import check_recipe, fit_enc, fit_rows, paired, shared_predictions
from nla.universal.extract import UniversalData, UniversalExtractConfig, universal_extract
from nla.universal.fit import fit_linear, solve

REPO = Path(__file__).resolve().parents[1]
MODELS = ["anc=tiny:llama", "tiny:qwen2", "tiny:gpt2"]
WIDTHS = {"anc": 64, "tiny-qwen2": 48, "tiny-gpt2": 32}


def extract_cfg(out: Path, **kw: object) -> UniversalExtractConfig:
    cfg = UniversalExtractConfig(out=str(out), models=list(MODELS), docs=24, positions_per_doc=6, min_position=8,
                                 seq_len=96, batch_size=8, device="cpu", docs_per_shard=10,
                                 split="av_sft=0.35,ar_sft=0.35,rl=0.05,eval=0.25")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def udata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("universal") / "U"
    universal_extract(extract_cfg(out))
    return out


def label_anchor(root: Path) -> None:
    """Explanations that carry information: the context's last words (set only on the anchor)."""
    ds = ActivationDataset.open(root / "anc")
    for shard, table in ds.iter_shards():
        expl = [" ".join(c.split()[-3:]) for c in table.column("context").to_pylist()]
        i = table.column_names.index("explanation")
        ds.replace_shard(shard, table.set_column(i, "explanation", pa.array(expl, pa.string())))


# ---------------------------------------------------------------- least squares
@pytest.mark.parametrize("tag", list(WIDTHS))
def test_fit_recovers_a_planted_map_on_real_activations(udata: Path, tag: str) -> None:
    data = UniversalData(udata)
    x, _, held = paired(data, tag, "anc", "positions")
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(x.shape[1], 64, generator=gen) / x.shape[1] ** 0.5
    b = torch.randn(64, generator=gen)
    y = x @ w + b  # noise-free: a correct fit is exact
    result = fit_linear(x[~held], y[~held], x[held], y[held])
    assert result.heldout["fve_nrm"] > 0.99 and result.train["fve_nrm"] > 0.99
    assert result.rank == x.shape[1]
    assert torch.allclose(result.layer.weight.T, w, atol=1e-3)
    assert torch.allclose(result.layer.bias, b, atol=1e-2)


def test_ridge_drivers_and_rank_deficient_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=gen)
    y = x @ torch.randn(24, 16, generator=gen) + 3
    w_y, _, _ = solve(x, y, driver="gelsy")
    w_s, _, _ = solve(x, y, driver="gelss")
    assert torch.allclose(w_y, w_s, atol=1e-4)
    w_r, _, _ = solve(x, y, ridge=0.5)
    assert w_r.norm() < 0.9 * w_y.norm()  # ridge shrinks
    # Fewer rows than dimensions: gelsy still answers (minimum norm) and fits the rows exactly.
    few = fit_linear(x[:10, :], y[:10])
    assert few.rank is not None and few.rank <= 9 and few.train["fve_nrm"] > 0.99
    with pytest.raises(NLAError, match="gelsd"):
        solve(x, y, driver="gelsd")
    with pytest.raises(NLAError, match="NaN"):
        solve(x.clone().fill_(float("nan")), y)


# ---------------------------------------------------------------- extraction
def test_rows_pair_the_same_text_and_pooling_matches_hidden_states(udata: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nla.data.corpus import load_corpus
    from nla.models.loading import resolve_model_path

    data = UniversalData(udata)
    assert data.anchor == "anc" and {t: m["d_model"] for t, m in data.models.items()} == WIDTHS
    contexts = {t: dict(zip(data.pairs(t), data.dataset(t).table(["context"]).column("context").to_pylist(),
                            strict=True)) for t in WIDTHS}
    shared = set(contexts["anc"]) & set(contexts["tiny-gpt2"]) & set(contexts["tiny-qwen2"])
    assert len(shared) > 0.9 * len(contexts["anc"])  # most anchor token ends are word ends for all
    for key in shared:
        texts = {" ".join(contexts[t][key].split()) for t in WIDTHS}
        assert len(texts) == 1, texts  # the same text prefix in every model
    # The pooled vector is the fp32 mean of hidden_states[K+1] over non-special tokens after the first.
    docs = {d.doc_id: d for d in load_corpus("builtin", max_docs=24)}
    ids, _, pooled = data.pooled("tiny-gpt2")
    path = resolve_model_path("tiny:gpt2")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    enc = tok(docs[ids[3]].text, truncation=True, max_length=96, return_special_tokens_mask=True)
    with torch.no_grad():
        hidden = model(torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[3][0]
    keep = [p for p, s in enumerate(enc["special_tokens_mask"]) if not s and p > 0]
    assert torch.allclose(pooled[3], hidden[keep].float().mean(0), atol=1e-4)


def test_extraction_resumes_a_lost_shard_and_refuses_other_settings(udata: Path, tmp_path: Path) -> None:
    copy = tmp_path / "U"
    shutil.copytree(udata, copy)
    before = ActivationDataset.open(copy / "tiny-qwen2").vectors()
    (copy / "tiny-qwen2" / "part-00001.parquet").unlink()  # as if killed while writing shard 1
    info = yaml.safe_load((copy / "nla_universal_data.yaml").read_text())
    info["models"]["tiny-qwen2"]["complete"] = False
    (copy / "nla_universal_data.yaml").write_text(yaml.safe_dump(info))
    universal_extract(extract_cfg(copy))
    assert torch.equal(ActivationDataset.open(copy / "tiny-qwen2").vectors(), before)
    with pytest.raises(NLAError, match="seq_len"):
        universal_extract(extract_cfg(copy, seq_len=64))


# ---------------------------------------------------------------- the whole recipe
def test_train_add_held_out_model_and_eval_end_to_end(udata: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from nla.train.sft import SFTConfig, with_tags
    from nla.universal.bundle import UniversalNLA

    root = tmp_path / "U"
    shutil.copytree(udata, root)
    label_anchor(root)
    for tag in ("tiny-qwen2", "tiny-gpt2"):
        assert main(["universal", "fit-enc", "--data", str(root), "--model", tag, "--ridge", "0.01"]) == 0
    assert "held-out fve_nrm" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["universal", "train", "--data", str(root), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "4", "--dec-rows", "24", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    # The trainer saw every model's rows, in the anchor's width, each with its tag.
    shared = ActivationDataset.open(run / "shared")
    rows = with_tags(shared, "av_sft")
    assert shared.d_model == 64 and {r["tag"] for r in rows} == set(WIDTHS)
    assert all(r["explanation"] for r in rows)  # labels copied from the anchor by text offset
    from nla.bundle import NLA
    from nla.train.sft import AVTask

    nla = NLA.from_pretrained(run / "sft")
    example = AVTask(nla, SFTConfig(max_length=256)).examples([r for r in rows if r["tag"] == "tiny-gpt2"][:1])[0]
    assert "tiny-gpt2" in nla.tokenizer.decode(example.ids[: example.n_prompt])

    bundle = run / "bundle"
    assert main(["universal", "add-model", "tiny:gemma", "--data", str(root), "--nla", str(bundle),
                 "--dec-rows", "24", "--eval-rows", "8", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny-gemma" in out and " yes " in out  # a per-model FVE row, marked held out
    meta = yaml.safe_load((bundle / "nla_meta.yaml").read_text())["extra"]["universal"]
    assert meta["anchor"] == "anc" and set(meta["tags"]) == {*WIDTHS, "tiny-gemma"}
    assert meta["models"]["tiny-gemma"]["trained"] is False and meta["models"]["tiny-gpt2"]["trained"] is True
    assert (bundle / "adapters" / "tiny-gemma" / "enc.safetensors").exists()

    u = UniversalNLA.from_pretrained(bundle)
    assert u.maps["tiny-gemma"][0].in_features == 64 and u.maps["tiny-gpt2"][1].out_features == 32
    # dec was fitted to the AR's actual round-trip predictions (not pinv(enc)): refit and compare.
    data = UniversalData(root)
    from nla.data.store import TRAINING_SPLITS

    native = fit_rows(data.dataset("tiny-gemma").vectors(TRAINING_SPLITS), 24, 0)
    pred = shared_predictions(u.nla, "tiny-gemma", u.encode("tiny-gemma", native), max_new_tokens=6)
    refit = fit_linear(pred, native, ridge=1e-3)
    enc, dec = u.maps["tiny-gemma"]
    pinv = torch.linalg.pinv(enc.weight)  # the known wrong objective: invert enc
    with torch.no_grad():
        err_saved = float(((dec(pred) - native) ** 2).mean())
        err_refit = float(((refit.layer(pred) - native) ** 2).mean())
        err_pinv = float((((pred - enc.bias) @ pinv.T - native) ** 2).mean())
    # The saved dec is the least-squares fit on the AR's real outputs: as good as a refit, better than pinv(enc).
    assert err_saved == pytest.approx(err_refit, rel=0.05)
    assert err_saved < err_pinv

    report = tmp_path / "eval.json"
    assert main(["universal", "eval", "--data", str(root), "--nla", str(bundle), "--rows", "8",
                 "--max-new-tokens", "6", "--device", "cpu", "--out", str(report)]) == 0
    table = {r["tag"]: r for r in json.loads(report.read_text())}
    assert set(table) == {*WIDTHS, "tiny-gemma"}
    assert [t for t, r in table.items() if r["held_out"]] == ["tiny-gemma"]
    for r in table.values():
        assert -4.0 <= r["fve_nrm"] <= 1.0 and r["rows"] == 8
    # The enc for the held-out model was fitted on held-out-by-document rows and reported.
    assert "heldout" in yaml.safe_load((root / "adapters" / "tiny-gemma" / "fit_enc.yaml").read_text())


# ---------------------------------------------------------------- errors and the recipe file
def test_bad_input_is_a_one_line_error(udata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["universal", "fit-enc", "--data", str(udata), "--model", "nope"], "not extracted"),
        (["universal", "fit-enc", "--data", str(tmp_path), "--model", "anc"], "not a universal extraction"),
        (["universal", "fit-enc", "--data", str(udata), "--model", "tiny-gpt2", "--driver", "gelsd"], "gelsd"),
        (["universal", "fit-enc", "--data", str(udata), "--model", "tiny-gpt2", "--source", "x"], "--source"),
        (["universal", "extract", "--out", str(tmp_path / "x"), "--models", "a=tiny:llama", "a=tiny:gpt2"], "twice"),
        (["universal", "train", "--data", str(udata), "--out", str(tmp_path / "r")], "labelled"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    with pytest.raises(NLAError):
        fit_enc(UniversalData(udata), "tiny-gpt2", source="pooled", driver="bogus")


def test_recipe_file_is_valid_and_checked(tmp_path: Path) -> None:
    data = check_recipe(REPO / "configs" / "universal.yaml")
    assert {"extract", "train", "add_model", "eval"} <= set(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  no_such_setting: 1\n")
    with pytest.raises(NLAError, match="no_such_setting"):
        check_recipe(bad)
