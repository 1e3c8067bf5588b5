"""`nla extract --next-tokens N`: the model's own next-token guesses stored beside each vector.

The reference is the plain causal-LM computation, as transformers' ``generate`` takes its
next-token distribution: ``softmax(model(ids[: p + 1]).logits[0, -1])``, one document at a
time, no padding, no hooks (transformers ``GenerationMixin._sample``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS, make_dataset

from nla.cli import main
from nla.data.corpus import load_corpus
from nla.data.store import ActivationDataset
from nla.errors import NLAError
from nla.models.loading import load_model
from nla.models.readout import NEXT_TOKEN_IDS, NEXT_TOKEN_PROBS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stored_guesses_equal_the_models_next_token_distribution(arch: str, tmp_path: Path) -> None:
    plain = make_dataset(tmp_path / "plain", arch, docs=6, seq_len=256, batch_size=4)
    tapped = make_dataset(tmp_path / "tapped", arch, docs=6, seq_len=256, batch_size=4, next_tokens=3)
    a, b = ActivationDataset.open(plain), ActivationDataset.open(tapped)
    # The extra pass through the later blocks leaves the vectors exactly as they were.
    assert torch.allclose(torch.as_tensor(a.vectors()), torch.as_tensor(b.vectors()), atol=1e-5, rtol=1e-5)
    table = b.table(None)
    rows = table.drop_columns(["activation_vector"]).to_pylist()
    assert rows and all(len(r[NEXT_TOKEN_IDS]) == len(r[NEXT_TOKEN_PROBS]) == 3 for r in rows)
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    texts = {d.doc_id: d.text for d in load_corpus("builtin", max_docs=6)}
    with torch.no_grad():
        for r in rows:
            ids = tok(texts[r["doc_id"]], truncation=True, max_length=256)["input_ids"][: r["position"] + 1]
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            top = torch.topk(probs, 3)
            assert r[NEXT_TOKEN_IDS] == top.indices.tolist(), (r["doc_id"], r["position"])
            assert torch.allclose(torch.tensor(r[NEXT_TOKEN_PROBS]), top.values, atol=1e-5)
            assert r[NEXT_TOKEN_PROBS] == sorted(r[NEXT_TOKEN_PROBS], reverse=True)


def test_lens_reads_stored_guesses_instead_of_running_the_model(tmp_path: Path) -> None:
    """Same labels either way; with the columns present the lens teacher runs no forward pass."""
    from nla.label import lens

    plain = make_dataset(tmp_path / "plain", "llama", docs=10)
    tapped = make_dataset(tmp_path / "tapped", "llama", docs=10, next_tokens=3)
    assert main(["label", "--data", str(plain), "--no-progress"]) == 0

    ran: list[int] = []
    original = lens.LensTeacher._predictions

    def counting(self: lens.LensTeacher, contexts: list[str]) -> list[list[tuple[int, float]]]:
        ran.append(len(contexts))
        return original(self, contexts)

    lens.LensTeacher._predictions = counting  # type: ignore[method-assign]
    try:
        assert main(["label", "--data", str(tapped), "--no-progress"]) == 0
    finally:
        lens.LensTeacher._predictions = original  # type: ignore[method-assign]
    assert ran == []
    want = [r["explanation"] for r in ActivationDataset.open(plain).rows()]
    got = [r["explanation"] for r in ActivationDataset.open(tapped).rows()]
    assert all(want) and got == want
    # The stored ids are tiny:llama's: a lens reading another model runs its own forward pass.
    lens.LensTeacher._predictions = counting  # type: ignore[method-assign]
    try:
        assert main(["label", "--data", str(tapped), "--teacher", "lens:tiny:qwen2", "--no-progress"]) == 0
    finally:
        lens.LensTeacher._predictions = original  # type: ignore[method-assign]
    assert sum(ran) > 0


def test_a_dataset_made_without_guesses_refuses_to_resume_with_them(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "d", "llama", docs=4)
    assert "next_tokens" not in ActivationDataset.open(out).meta.sampling  # older sidecars stay valid
    with pytest.raises(NLAError, match=r"sampling\.next_tokens"):
        make_dataset(out, "llama", docs=4, next_tokens=2)
