"""The probes' text rewrites and the bag-of-words ridge baseline, on their own."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nla import metrics
from nla.eval import baselines, probes

LENS = (
    "- Its most distinctive words, compared with the rest of the corpus, are \"assert\" and \"stmt\".\n"
    "- The current sentence or line started with \"Assert statements are\" and is 9 words long so far.\n"
    "- It ends with \"a program:\", and the model predicts \"newline\" (40%) next."
)


def test_paraphrase_is_deterministic_keeps_quotes_and_rotates_claims() -> None:
    out = probes.paraphrase(LENS)
    assert out == probes.paraphrase(LENS)
    assert out != LENS
    claims, style = probes.split_claims(out)
    assert style == "lines" and len(claims) == 3
    assert claims[0].startswith("It finishes with \"a program:\"")  # the last claim leads now
    for quoted in ('"assert"', '"stmt"', '"Assert statements are"', '"a program:"', '"newline"'):
        assert quoted in out  # evidence inside quotes is never rewritten
    assert "expects" in out and "predicts" not in out


def test_claims_split_by_line_or_sentence_and_drop() -> None:
    assert probes.drop_claim(LENS, 1) == "\n".join(LENS.splitlines()[::2])
    prose = "The text is about Python. It ends mid-word. The next token is likely a letter."
    claims, style = probes.split_claims(prose)
    assert style == "sentences" and len(claims) == 3
    assert probes.drop_claim(prose, 0) == "It ends mid-word. The next token is likely a letter."
    assert probes.drop_claim("just one claim", 0) is None


@given(st.lists(st.text(alphabet="abcdef ", min_size=1, max_size=6), min_size=1, max_size=20), st.integers(0, 99))
@settings(max_examples=50, deadline=None)
def test_word_shuffle_keeps_the_bag_of_words(words: list[str], seed: int) -> None:
    text = " ".join(words)
    out = probes.shuffle_words(text, seed)
    assert sorted(out.split()) == sorted(text.split())
    assert out == probes.shuffle_words(text, seed)


def test_judge_score_parser() -> None:
    assert probes.parse_score("Score: 4") == 4
    assert probes.parse_score("nothing") is None
    assert probes.parse_score(None) is None


def test_ridge_recovers_a_linear_word_map() -> None:
    """Vectors that are a sum of per-word directions are read back by the ridge baseline."""
    gen = torch.Generator().manual_seed(0)
    vocab = [f"w{i}" for i in range(12)]
    dirs = torch.randn(len(vocab), 16, generator=gen)
    texts, vecs, groups = [], [], []
    for r in range(300):
        pick = torch.randperm(len(vocab), generator=gen)[:3].tolist()
        texts.append(" ".join(vocab[i] for i in pick))
        vecs.append(dirs[pick].sum(0))
        groups.append(f"doc{r}")
    model = baselines.BowRidge.fit(texts, torch.stack(vecs), groups)
    assert len(model.vocab) == len(vocab)
    pred = model.predict(texts[:50])
    assert float(metrics.cosine(pred, torch.stack(vecs[:50])).mean()) > 0.95
    mean = metrics.normalize(torch.stack(vecs)).mean(0)
    assert metrics.fve_nrm(pred, torch.stack(vecs[:50]), mean) > 0.8


def test_mean_direction_scores_zero_meannorm() -> None:
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(40, 24, generator=gen) + 3.0
    mean = metrics.normalize(v).mean(0)
    pred = baselines.mean_direction(mean, len(v))
    assert abs(metrics.fve_meannorm(pred, v, mean)) < 1e-6
    assert metrics.fve_nrm(pred, v, mean) < 0
