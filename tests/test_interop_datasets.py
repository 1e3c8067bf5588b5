"""Published warm-start data: explanations in `response` / `api_explanation`, split by document.

Followed: the paper's datagen schema as nanoNLA ships it — senku14x/nanoNLA
`nla/datagen/sidecar.py` (`<file>.parquet.nla_meta.yaml`, `kind: nla_dataset`, `stage`,
`extraction: {base_model, d_model, layer_index}`), `nla/schema.py` (`wrap_explanation`:
`response` = `<explanation>\\n…\\n</explanation>`, `api_explanation` the raw text, the
`activation_vector` list column) and `nla/train_sft.py` `load_sft_dataset` (columns `prompt`,
`response`, `activation_vector`; a `doc_id` per document). `nla train sft` must train on such a
file directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from nla.data.store import ActivationDataset
from nla.models.loading import resolve_model_path

D, LAYER = 48, 2
TEXTS = ["a cat on a mat", "python code with loops", "a list of numbers", "legal text about contracts"]


def write_published(path: Path, *, columns: tuple[str, ...] = ("response",), n_docs: int = 24,
                    stage: str = "av_sft") -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for doc in range(n_docs):
        for pos in range(3):
            text = TEXTS[(doc + pos) % len(TEXTS)]
            rows.append({"doc_id": 1000 + doc, "position": pos, "text": text})
    table: dict[str, object] = {
        "doc_id": pa.array([r["doc_id"] for r in rows], pa.int64()),
        "prompt": pa.array([[{"role": "user", "content": "Vector: <concept><INJECT></concept>"}] for _ in rows]),
        "activation_vector": pa.array(rng.standard_normal((len(rows), D)).astype(np.float32).tolist(),
                                      pa.list_(pa.float32())),
    }
    if "response" in columns:
        table["response"] = pa.array([f"<explanation>\n{r['text']}\n</explanation>" for r in rows])
    if "api_explanation" in columns:
        table["api_explanation"] = pa.array([r["text"] for r in rows])
    pq.write_table(pa.table(table), path)
    sidecar = {"dataset_id": "tiny", "stage": stage, "row_count": len(rows), "kind": "nla_dataset",
               "schema_version": 1,
               "extraction": {"base_model": resolve_model_path("tiny:qwen2"), "d_model": D, "layer_index": LAYER,
                              "norm": "none", "corpus": "tiny", "corpus_slice": {"start": 0, "end": n_docs},
                              "positions_per_doc": 3},
               "prompt_templates": {"actor": "Vector: <concept>{injection_char}</concept>"}}
    Path(str(path) + ".nla_meta.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
    return path


def test_published_columns_are_mapped_and_split_by_document(tmp_path: Path) -> None:
    for columns in (("response",), ("api_explanation",), ("response", "api_explanation")):
        ds = ActivationDataset.open(write_published(tmp_path / f"{'_'.join(columns)}.parquet", columns=columns))
        rows = ds.rows()
        assert [r["explanation"] for r in rows[:3]] == [TEXTS[0], TEXTS[1], TEXTS[2]]  # tags unwrapped
        by_doc: dict[str, set[str]] = {}
        for r in rows:
            by_doc.setdefault(r["doc_id"], set()).add(r["split"])
        assert all(len(s) == 1 for s in by_doc.values())  # no document straddles two splits
        counts = {s: sum(1 for r in rows if r["split"] == s) for s in ("av_sft", "ar_sft", "rl", "eval")}
        assert counts["av_sft"] and counts["ar_sft"] and counts["eval"], counts
        assert len(ds.vectors("av_sft")) == counts["av_sft"]  # vectors follow the same split


def test_nla_train_sft_trains_on_a_published_file(tmp_path: Path) -> None:
    from nla.train.sft import SFTConfig, train_sft

    data = write_published(tmp_path / "av_sft.parquet", n_docs=40)
    run = tmp_path / "run"
    train_sft(SFTConfig(data=str(data), out=str(run), device="cpu", progress=False, batch_size=4, max_steps=2,
                        eval_every=0, save_every=0, eval_rows=8))
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for phase in ("av", "ar"):  # both halves trained their two steps on the mapped rows
        assert [r["step"] for r in records if r["phase"] == phase] == [1, 2]
    assert (run / "nla_meta.yaml").exists()
