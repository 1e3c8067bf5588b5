"""Local teachers: the offline `lens` default and `hf:` chat models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nla.cli import main
from nla.data.store import ActivationDataset
from nla.label.cache import LabelCache
from nla.label.lens import LensTeacher
from nla.label.prompt import explanation_features, parse_analysis
from nla.label.runner import LabelConfig, label


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def explanations(data: Path) -> list[str | None]:
    return [r["explanation"] for r in ActivationDataset.open(data).rows()]


def test_lens_labels_every_row_deterministically(tiny_dataset: Path, tmp_path: Path) -> None:
    a, b = copy(tiny_dataset, tmp_path / "a"), copy(tiny_dataset, tmp_path / "b")
    assert main(["label", "--data", str(a), "--no-progress"]) == 0
    assert main(["label", "--data", str(b), "--teacher", "lens", "--no-progress", "--batch-size", "16"]) == 0
    first, second = explanations(a), explanations(b)
    assert first == second
    assert all(e is not None for e in first)
    rows = ActivationDataset.open(a).rows()
    by_context = {r["context"]: r["explanation"] for r in rows}
    # different contexts, different explanations
    assert len(set(by_context.values())) == len(by_context)
    for r in rows:
        features = explanation_features(r["explanation"])
        assert parse_analysis("<analysis>\n" + r["explanation"] + "\n</analysis>") == features
        assert len(features) == 3
        # the short style: no sentence around the facts, each line led by one word
        assert [f.split()[0] for f in features] == ["ends", "predicts", "about"], features
        assert all(len(f.split()) <= 12 for f in features), features
    meta = ActivationDataset.open(a).labeling
    assert meta is not None
    assert meta["teacher"] == "lens:tiny:llama" and meta["rows_labelled"] == len(rows)
    assert meta["lens_version"] == "lens-v2"


def test_lens_long_style_is_kept_and_never_mixed_with_short(tiny_dataset: Path, tmp_path: Path) -> None:
    # Both styles share one label cache per dataset: the cache key must tell them apart, or a
    # re-label in the other style would silently return the first style's answers.
    data = copy(tiny_dataset, tmp_path / "d")
    assert main(["label", "--data", str(data), "--teacher", "lens-long", "--no-progress"]) == 0
    long = explanations(data)
    assert all(e is not None and len(explanation_features(e)[0].split()) >= 10 for e in long)
    assert (ActivationDataset.open(data).labeling or {})["lens_version"] == "lens-v1"
    short = LensTeacher("tiny:llama", device="cpu")
    assert short.cache_model != LensTeacher("tiny:llama", device="cpu", style="long").cache_model
    assert short.spec == "lens:tiny:llama"


def test_lens_features_are_true(tiny_dataset: Path) -> None:
    teacher = LensTeacher("tiny:llama", device="cpu")
    rows = ActivationDataset.open(tiny_dataset).rows()[:6]
    teacher.prepare({r["doc_id"]: r["context"] for r in rows})
    tops = teacher._predictions([r["context"] for r in rows])
    # batching with left padding gives the same predictions as one row at a time
    for r, top in zip(rows, tops):
        alone = teacher._predictions([r["context"]])[0]
        assert [t for t, _ in alone] == [t for t, _ in top]
        assert [round(p, 4) for _, p in alone] == [round(p, 4) for _, p in top]
    ctx = "The parser reads tokens.\nThen the parser builds a tree of nodes and"
    end = teacher.ending(ctx, tops[0])
    assert end.startswith('It ends with "of nodes and"')
    assert teacher.sentence(ctx) == 'The current sentence or line started with "Then the parser" and is 9 words long so far.'
    assert '"parser"' in teacher.distinctive(ctx)
    assert teacher.sentence("One sentence ends here. ").startswith("A new sentence or line is about to begin")
    # the short style states the same facts without the sentences around them
    assert teacher.short_ending(ctx) == 'ends "tree of nodes and"'
    assert teacher.short_ending("a list:\n") == 'ends "a list:" then a line break'
    # every short feature has the three words the strict parser asks for, even at the edges
    for edge in ("word", "word ", "  ", ""):
        features = [teacher.short_ending(edge), teacher.short_next(tops[0]), teacher.short_topic(edge)]
        assert parse_analysis("<analysis>\n" + "\n".join(f"- {f}" for f in features) + "\n</analysis>") == features
    assert teacher.short_next(tops[0]).startswith("predicts " + teacher._token(tops[0][0][0]))
    assert teacher.short_topic(ctx).startswith('about "parser"')


def test_hf_teacher_plumbing_counts_failures(tiny_dataset: Path, tmp_path: Path) -> None:
    # A random tiny model writes garbage: every row must end counted as failed, and cached,
    # so a re-run generates nothing.
    data = copy(tiny_dataset, tmp_path / "data")
    cfg = LabelConfig(data=str(data), teacher="hf:tiny:llama", limit=6, max_tokens=8, max_retries=1, torch_threads=1,
                      batch_size=4, device="cpu", progress=False, allow_partial=True)
    summary = label(cfg)
    assert summary.todo == 6 and summary.failed == 6 and summary.labelled == 0
    assert summary.requests == 12  # one try and one retry each
    assert len(LabelCache(data / "label_cache.sqlite")) == 6
    again = label(cfg)
    assert again.failed == 6 and again.requests == 0
    assert all(e is None for e in explanations(data))


@pytest.mark.slow
def test_lens_on_embedded_default(tmp_path: Path) -> None:
    from nla.data.extract import ExtractConfig, extract

    data = tmp_path / "smollm2"
    extract(ExtractConfig(out=str(data), model="default", layer=20, docs=8, positions_per_doc=2,
                          seq_len=128, device="cpu"))
    summary = label(LabelConfig(data=str(data), progress=False, device="cpu"))
    rows = ActivationDataset.open(data).rows()
    assert summary.labelled == len(rows) > 0 and summary.failed == 0
    assert len({r["explanation"] for r in rows}) == len({r["context"] for r in rows})
    assert (ActivationDataset.open(data).labeling or {})["model"] == "smollm2-135m"
