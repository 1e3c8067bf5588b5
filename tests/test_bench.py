"""`nla bench` on tiny models: a pinned bench (content hash catches edits), two NLAs scored with
exactly the numbers `nla eval` gives on the same rows, the leaderboard in three formats, and
model-index blocks that huggingface_hub parses.

The model-index format follows huggingface_hub's ``repocard_data.py``
(huggingface/huggingface_hub, ``src/huggingface_hub/repocard_data.py``: ``EvalResult``,
``model_index_to_eval_results``), which we call rather than re-implement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_dataset

from nla.bundle import NLA
from nla.cli import main
from nla.errors import NLAError
from nla.eval.bench import Bench, make_bench

PROTOCOL = ["--max-new-tokens", "6", "--best-of", "0", "--bootstrap", "50", "--n-candidates", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    from nla.label.runner import LabelConfig, label

    root = tmp_path_factory.mktemp("bench")
    data = make_dataset(root / "data", docs=16, split="av_sft=0.2,ar_sft=0.4,rl=0.1,eval=0.3")
    label(LabelConfig(data=str(data), teacher="lens", device="cpu", progress=False))
    a, b = root / "nla_a", root / "nla_b"
    NLA.initialize(dataset=data, device="cpu").save_pretrained(a)
    other = NLA.initialize(dataset=data, device="cpu")
    other.ar.value_head.weight.data.mul_(-1.0)  # a worse AR: reconstructions point the other way
    other.save_pretrained(b)
    bench = root / "bench"
    assert main(["bench", "make", "--data", str(data), "--out", str(bench), "--max-rows", "10", *PROTOCOL]) == 0
    return data, a, b, bench


def test_manifest_pins_the_bench(setup: tuple[Path, Path, Path, Path]) -> None:
    data, _, _, bench = setup
    man = yaml.safe_load((bench / "bench.yaml").read_text())
    assert man["kind"] == "nla_bench" and man["eval_rows"] == 10 and man["ridge_rows"] > 0
    assert man["protocol"]["max_new_tokens"] == 6 and man["protocol"]["best_of"] == 0
    assert man["corpus"] and man["layer_index"] == 2 and len(man["content_sha256"]) == 64
    # Deterministic: the same source and settings give the same hash.
    again = make_bench(data, bench.parent / "again", max_rows=10,
                       protocol={"max_new_tokens": 6, "best_of": 0, "bootstrap": 50, "n_candidates": 4})
    assert again["content_sha256"] == man["content_sha256"] and again["positions_sha256"] == man["positions_sha256"]
    other = make_bench(data, bench.parent / "other", max_rows=10, seed=1)
    assert other["content_sha256"] != man["content_sha256"]


def test_edited_bench_is_refused(setup: tuple[Path, Path, Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    _, _, _, bench = setup
    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    assert main(["bench", "verify", str(copy)]) == 0
    part = copy / "data" / "part-00000.parquet"
    table = pq.read_table(part)
    labels = table.column("explanation").to_pylist()
    labels[0] = "an edited label"
    import pyarrow as pa

    pq.write_table(table.set_column(table.column_names.index("explanation"), "explanation", pa.array(labels)), part)
    with pytest.raises(NLAError, match="bench data was changed"):
        Bench.open(copy)
    assert main(["bench", "verify", str(copy)]) == 2
    assert "bench data was changed" in capsys.readouterr().err


def test_run_scores_like_eval_and_writes_leaderboard(setup: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    _, a, b, bench = setup
    out = tmp_path / "lb"
    assert main(["bench", "run", str(bench), "--nla", f"good={a}", "--nla", str(b), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out / "leaderboard.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert set(names) == {"good", "nla_b"}
    fve = {n: json.loads((out / "reports" / n / "metrics.json").read_text())["round_trip"]["fve_nrm"] for n in names}
    assert names == sorted(names, key=lambda n: -fve[n])  # ranked by the headline
    # One implementation: `nla eval` on the bench's rows with the bench's protocol gives the same numbers.
    ev = tmp_path / "eval"
    assert main(["eval", "--nla", str(a), "--data", str(bench / "data"), "--out", str(ev), "--device", "cpu",
                 "--no-progress", *PROTOCOL]) == 0
    m_eval = json.loads((ev / "metrics.json").read_text())
    m_bench = json.loads((out / "reports" / "good" / "metrics.json").read_text())
    for path in (("round_trip", "fve_nrm"), ("round_trip", "top1"), ("ar_alone", "fve_nrm"),
                 ("baselines", "bow_ridge"), ("probes", "claim_ablation"), ("causal", "fraction_recovered")):
        assert m_bench[path[0]][path[1]] == m_eval[path[0]][path[1]], path
    assert m_bench["bench"]["content_sha256"] == summary["bench"]["content_sha256"]
    assert m_bench["dataset"]["mean_vector_source"] == "bench"
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n| ") == 3 and summary["bench"]["content_sha256"] in md
    assert f"{fve['good']:.3f}" in md
    page = (out / "leaderboard.html").read_text()
    assert 'href="reports/good/index.html"' in page and 'id="leaderboard"' in page


def test_model_index_parses_with_huggingface_hub(setup: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    _, a, _, bench = setup
    out = tmp_path / "lb"
    assert main(["bench", "run", str(bench), "--nla", str(a), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    block = yaml.safe_load((out / "model_index" / "nla_a.yaml").read_text())["model-index"]
    name, results = model_index_to_eval_results(block)
    m = json.loads((out / "reports" / "nla_a" / "metrics.json").read_text())
    assert name == "nla_a"
    by_type = {(r.task_type, r.metric_type): r for r in results}
    rt = by_type[("nla-round-trip", "fve_nrm")]
    assert rt.metric_value == pytest.approx(m["round_trip"]["fve_nrm"], abs=1e-6)
    assert rt.dataset_revision == m["bench"]["content_sha256"][:12] and rt.dataset_split == "eval"
    assert by_type[("nla-causal-faithfulness", "kl_fraction_recovered")].metric_value == pytest.approx(
        m["causal"]["fraction_recovered"], abs=1e-6)
    # And a card's metadata built from it round-trips through ModelCardData.
    card = ModelCardData(model_name=name, eval_results=results).to_dict()
    assert card["model-index"][0]["results"]


def test_bad_input(setup: tuple[Path, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, a, _, _ = setup
    assert main(["bench", "make", "--data", str(data), "--out", str(tmp_path / "x"), "--split", "ar_sft"]) == 2
    assert main(["bench", "run", str(tmp_path / "nope"), "--nla", str(a), "--out", str(tmp_path / "o")]) == 2
    other = make_dataset(tmp_path / "gpt2", arch="gpt2", docs=6, split="av_sft=0.2,ar_sft=0.4,rl=0.1,eval=0.3")
    assert main(["bench", "make", "--data", str(other), "--out", str(tmp_path / "b2")]) == 0
    assert main(["bench", "run", str(tmp_path / "b2"), "--nla", str(a), "--out", str(tmp_path / "o2"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [e for e in err.splitlines() if e.startswith("nla bench: error:")]
    assert len(errors) == 3 and ("layer" in errors[2] or "d_model" in errors[2])


def test_run_dtype_takes_the_shared_choices(setup: tuple[Path, Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`bench run --dtype` offers the same choices as every other command (nla.config.DTYPE_CHOICES):
    a dtype outside them is refused by the parser, before any bundle is loaded or --out is made."""
    from nla.config import DTYPE_CHOICES

    _, a, _, bench = setup
    out = tmp_path / "lb"
    with pytest.raises(SystemExit) as stop:
        main(["bench", "run", str(bench), "--nla", str(a), "--out", str(out), "--dtype", "float64"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'float64'" in err and all(c in err for c in DTYPE_CHOICES)
    assert not out.exists()
