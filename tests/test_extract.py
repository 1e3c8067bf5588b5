"""nla.data.extract: stored vectors follow the layer convention, padding, early exit, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, make_dataset

from nla.data.corpus import load_corpus
from nla.data.extract import ExtractConfig, extract
from nla.data.sampling import assign_split, parse_split, sample_positions
from nla.data.store import SPLITS, ActivationDataset
from nla.errors import NLAError
from nla.models.forward import BlockOutput, block_states
from nla.models.layers import decoder_blocks
from nla.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]
LAYER = 2  # of 4 tiny blocks: the default (2 * 4) // 3, with one block after it to skip


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stored_vectors_equal_unbatched_hidden_states(arch: str, tmp_path: Path) -> None:
    """Every stored vector is ``output_hidden_states[K+1]`` of a plain single-document forward.

    seq_len 512 keeps documents at different lengths, so batches are padded, and it is longer
    than Gemma's sliding window (16 in the tiny model), so the window meets the padding too.
    """
    out = make_dataset(
        tmp_path / arch, arch, docs=10, seq_len=512, batch_size=4, docs_per_shard=4, layer=None
    )
    ds = ActivationDataset.open(out)
    assert ds.meta.layer_index == LAYER and ds.meta.complete
    assert len(ds.shards) == 3
    rows, vectors = ds.rows(), ds.vectors()
    assert len(rows) == len(vectors) == ds.meta.rows > 0
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    texts = {d.doc_id: d.text for d in load_corpus("builtin", max_docs=10)}
    refs: dict[str, tuple[list[int], torch.Tensor]] = {}
    with torch.no_grad():
        for doc_id, text in texts.items():
            enc = tok(text, truncation=True, max_length=512)
            hidden = model(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            refs[doc_id] = (enc["input_ids"], hidden)
    lengths = {len(token_ids) for token_ids, _ in refs.values()}
    assert len(lengths) > 1, "documents all have one length: the test would not exercise padding"
    for row, vec in zip(rows, vectors, strict=True):
        ids, hidden = refs[row["doc_id"]]
        p = row["position"]
        assert _rel_err(vec, hidden[p]) <= 1e-4, (row["doc_id"], p)
        assert row["context"] == tok.decode(ids[: p + 1], skip_special_tokens=True)
        assert p >= 8 and ids[p] not in tok.all_special_ids
    assert {r["doc_id"] for r in rows} == set(texts)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_and_right_padding_equal_unpadded(arch: str) -> None:
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    docs = load_corpus("builtin", max_docs=3)
    # Very different lengths, so one sequence is mostly padding.
    seqs = [tok(d.text, truncation=True, max_length=n)["input_ids"] for d, n in zip(docs, (60, 13, 37), strict=True)]
    pad_id = tok.pad_token_id
    with BlockOutput(model, LAYER) as run:
        single = [block_states(run, [s], pad_id, torch.device("cpu"))[0] for s in seqs]
        for side in ("right", "left"):
            batched = block_states(run, seqs, pad_id, torch.device("cpu"), side=side)
            for s, one, many in zip(seqs, single, batched, strict=True):
                assert many.shape == (len(s), model.config.hidden_size if arch != "gpt2" else model.config.n_embd)
                assert _rel_err(many, one) <= 1e-4, side
    with torch.no_grad():
        for s, one in zip(seqs, single, strict=True):
            ref = model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            assert _rel_err(one, ref) <= 1e-4


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_forward_stops_at_block_k(arch: str) -> None:
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    blocks = decoder_blocks(model)
    calls = [0] * len(blocks)
    head_calls = [0]
    handles = [
        block.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(blocks)
    ]
    handles.append(model.get_output_embeddings().register_forward_hook(
        lambda *_a: head_calls.__setitem__(0, head_calls[0] + 1)
    ))
    seqs = [tok("a short document about loops")["input_ids"]] * 2
    try:
        with BlockOutput(model, 1) as run:
            block_states(run, seqs, tok.pad_token_id, torch.device("cpu"))
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 0, 0]
    assert head_calls == [0]
    # The hook is removed on exit: a plain forward runs every block again.
    with torch.no_grad():
        model(input_ids=torch.tensor(seqs[:1]))


def test_sampling_is_keyed_per_document() -> None:
    mask = [1] + [0] * 99
    mask[60] = 1
    a = sample_positions(3, "doc-a", mask, 5, 50)
    assert a == sample_positions(3, "doc-a", mask, 5, 50)
    assert len(a) == 5 and a == sorted(a) and all(p >= 50 and p != 60 for p in a)
    assert sample_positions(3, "doc-b", mask, 5, 50) != a or sample_positions(4, "doc-a", mask, 5, 50) != a
    # Too few candidates: take them all, never one before the minimum.
    assert sample_positions(0, "x", [0] * 10, 5, 7) == [7, 8, 9]
    assert sample_positions(0, "x", [0] * 5, 5, 7) == []


def test_split_by_document() -> None:
    fractions = parse_split("av_sft=4,ar_sft=3,rl=2,eval=1")
    assert fractions == pytest.approx({"av_sft": 0.4, "ar_sft": 0.3, "rl": 0.2, "eval": 0.1})
    ids = [f"doc{i}" for i in range(2000)]
    splits = [assign_split(0, d, fractions) for d in ids]
    assert splits == [assign_split(0, d, fractions) for d in ids]
    for name, frac in fractions.items():
        assert abs(splits.count(name) / len(ids) - frac) < 0.04
    assert set(parse_split("eval=1").values()) == {0.0, 1.0}
    for bad, msg in (("train=1", "unknown split"), ("eval", "NAME=FRACTION"), ("eval=x", "not a number"),
                     ("eval=0", "not all zero")):
        with pytest.raises(NLAError, match=msg):
            parse_split(bad)


def test_dataset_rows_and_sidecar(tiny_dataset: Path) -> None:
    ds = ActivationDataset.open(tiny_dataset)
    rows = ds.rows()
    by_doc: dict[str, set[str]] = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_doc.values()), "a document straddles two splits"
    assert {r["split"] for r in rows} <= set(SPLITS)
    assert all(n <= 4 for n in (sum(r["doc_id"] == d for r in rows) for d in by_doc))
    meta = ds.meta
    assert meta.kind == "nla_dataset" and meta.rows == len(rows) == len(ds)
    assert meta.norm_stats["min"] <= meta.norm_stats["mean"] <= meta.norm_stats["max"]
    assert meta.injection_scale is not None and meta.injection_scale > meta.norm_stats["mean"]
    mean = ds.mean_vector()
    assert mean.shape == (meta.d_model,)
    assert (tiny_dataset / "extract_config.yaml").exists()


# ------------------------------------------------------------------------- resume and refusal
RESUME_ARGS = [
    "--model", "tiny:llama", "--layer", "1", "--corpus", "builtin", "--docs", "60",
    "--docs-per-shard", "5", "--batch-size", "2", "--seq-len", "256", "--min-position", "8",
    "--positions-per-doc", "3", "--device", "cpu",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nla.cli", "extract", *args]


def _snapshot(path: Path) -> tuple[list[tuple], np.ndarray]:
    table = ActivationDataset.open(path).table()
    keys = list(zip(*(table.column(c).to_pylist() for c in ("doc_id", "position", "context", "split")), strict=True))
    return keys, ActivationDataset.open(path).vectors().numpy()


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*RESUME_ARGS, "--out", str(killed)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "part-00000.parquet").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    written = sorted(killed.glob("part-*.parquet"))
    assert 1 <= len(written) < 12, "the run finished before it was killed: nothing to resume"
    assert ActivationDataset.open(killed).meta.complete is False

    resumed = subprocess.run(_cli(*RESUME_ARGS, "--out", str(killed)), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(killed.glob(".*tmp*")), "temporary files left behind"

    clean = tmp_path / "clean"
    subprocess.run(_cli(*RESUME_ARGS, "--out", str(clean)), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    keys_a, vecs_a = _snapshot(killed)
    keys_b, vecs_b = _snapshot(clean)
    assert len(keys_a) == len(set(keys_a)), "a row appears twice"
    assert keys_a == keys_b
    np.testing.assert_array_equal(vecs_a, vecs_b)
    assert [p.name for p in sorted(killed.glob("part-*.parquet"))] == [
        p.name for p in sorted(clean.glob("part-*.parquet"))
    ]
    meta_a, meta_b = ActivationDataset.open(killed).meta, ActivationDataset.open(clean).meta
    assert meta_a.complete and meta_a.rows == meta_b.rows == len(keys_b)
    assert meta_a.norm_stats == pytest.approx(meta_b.norm_stats)


def _small_cfg(out: Path, **kw: object) -> ExtractConfig:
    cfg = ExtractConfig(out=str(out), model="tiny:llama", layer=1, docs=8, positions_per_doc=2,
                        min_position=8, seq_len=64, batch_size=4, device="cpu", docs_per_shard=3)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def test_rerunning_a_complete_dataset_does_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    extract(_small_cfg(out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    again = extract(_small_cfg(out))
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert again.meta.rows == ActivationDataset.open(out).meta.rows


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"layer": 2}, "layer_index"),
        ({"seed": 1}, "seed"),
        ({"positions_per_doc": 3}, "positions_per_doc"),
        ({"split": "av_sft=1,eval=1"}, "split_fractions"),
        ({"dtype": "bfloat16"}, "dtype"),
    ],
)
def test_different_settings_are_refused(tmp_path: Path, change: dict, named: str) -> None:
    out = tmp_path / "d"
    extract(_small_cfg(out, docs=3))
    with pytest.raises(NLAError, match=named) as err:
        extract(_small_cfg(out, docs=3, **change))
    assert str(out) in str(err.value)


def test_refusal_via_cli_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "d"
    extract(_small_cfg(out, docs=3))
    args = ["--model", "tiny:llama", "--layer", "2", "--docs", "3", "--out", str(out)]
    res = subprocess.run(_cli(*args), cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "layer_index" in lines[0] and "Traceback" not in res.stderr


def test_non_dataset_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NLAError, match="not an activation dataset"):
        extract(_small_cfg(tmp_path))


def test_two_processes_write_the_dataset_one_process_writes(tmp_path: Path) -> None:
    """`accelerate launch -m nla.cli extract` on 2 CPU processes (gloo): each rank extracts whole
    shards (round-robin), the main process writes the metadata and the statistics; the result
    has the same rows, vectors, shard files and statistics as one process, with no duplicate.
    Launched like the SFT DDP test (`--multi_gpu` starts two processes, `--device cpu`)."""
    import shutil

    from test_sft import free_port

    args = [*RESUME_ARGS[:RESUME_ARGS.index("--docs") + 1], "14", *RESUME_ARGS[RESUME_ARGS.index("--docs") + 2:]]
    one = tmp_path / "one"
    subprocess.run(_cli(*args, "--out", str(one)), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True, timeout=300)
    two = tmp_path / "two"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    res = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "nla.cli", "extract", *args, "--out", str(two)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rows, d_model=") == 1  # the summary line comes from the main process only
    keys_a, vecs_a = _snapshot(one)
    keys_b, vecs_b = _snapshot(two)
    assert len(keys_b) == len(set(keys_b)) and keys_a == keys_b
    np.testing.assert_array_equal(vecs_a, vecs_b)
    assert [p.name for p in sorted(two.glob("part-*.parquet"))] == [p.name for p in sorted(one.glob("part-*.parquet"))]
    assert len(list(two.glob("part-*.parquet"))) == 3  # 14 docs / 5 per shard: an odd count over 2 ranks
    meta_a, meta_b = ActivationDataset.open(one).meta, ActivationDataset.open(two).meta
    assert meta_b.complete and meta_a.rows == meta_b.rows
    assert meta_a.norm_stats == pytest.approx(meta_b.norm_stats)
    torch.testing.assert_close(ActivationDataset.open(one).mean_vector(), ActivationDataset.open(two).mean_vector())
