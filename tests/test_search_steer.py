"""`nla search` and `nla steer` on a tiny model, and the /v1/search endpoint on a real local server.

A planted AR makes the answers known: a value head with zero weight and a bias always returns
the bias, so AR(any text) is a vector we choose (an imported head may carry a bias, see
nla/bundle.py). Steering follows the additive rule of docs/design.md §4 (as Karvonen's
activation steering; our hook is our own).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_dataset

from nla.bundle import NLA
from nla.cli import main
from nla.data.store import ActivationDataset
from nla.search import SearchIndex, concept_direction, normalized, search
from nla.serve import ServeConfig, create_app, running_server
from nla.steer import dose_response_table, parse_scales, steer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("search")
    data = make_dataset(root / "data", docs=10, split="av_sft=0.2,ar_sft=0.4,rl=0.1,eval=0.3")
    bundle = root / "bundle"
    NLA.initialize(dataset=data, device="cpu").save_pretrained(bundle)
    return data, bundle


def plant(nla: NLA, vector: torch.Tensor) -> None:
    """AR(text) = vector for every text."""
    nla.ar.value_head.weight.data.zero_()
    nla.ar.value_head.bias = torch.nn.Parameter(vector.float().clone())


def test_planted_query_finds_its_row(setup: tuple[Path, Path]) -> None:
    data, bundle = setup
    nla = NLA.from_pretrained(bundle, device="cpu")
    index = SearchIndex.open(data)
    target = 17
    plant(nla, ActivationDataset.open(data).vectors()[target] * 3.0)  # the scale must not matter
    hits = search(nla, index, "anything at all", k=5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["row"] == target and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["context"] == index.rows[target]["context"]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(hits))
    # Centred scores rank differently from raw cosine: every raw cosine is high on an anisotropic layer.
    assert hits[-1]["cosine"] > hits[-1]["score"]


def test_search_explains_hits_with_the_av(setup: tuple[Path, Path]) -> None:
    data, bundle = setup
    nla = NLA.from_pretrained(bundle, device="cpu")
    index = SearchIndex.open(data, split="eval")
    hits = search(nla, index, "a Python keyword", k=2, explain=True, max_new_tokens=4)
    want = nla.verbalize(index.vectors[[h["row"] for h in hits]], n=1, max_new_tokens=4)
    assert [h["av_explanation"] for h in hits] == [w[0].explanation if w[0].explanation is not None else w[0].raw for w in want]
    assert {r["split"] for r in index.rows} == {"eval"}


def test_search_cli_json_and_bad_input(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, bundle = setup
    assert main(["search", "--nla", str(bundle), "--data", str(data), "-k", "3", "--json", "--device", "cpu", "loops"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "loops" and len(out["hits"]) == 3
    assert main(["search", "--nla", str(bundle), "--data", str(data), "-k", "0", "loops"]) == 2
    assert main(["search", "--nla", str(bundle), "--data", str(data / "nope"), "loops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("nla search: error:") for line in err)


def test_steer_dose_response(setup: tuple[Path, Path]) -> None:
    data, bundle = setup
    nla = NLA.from_pretrained(bundle, device="cpu")
    ds = ActivationDataset.open(data)
    plant(nla, ds.vectors()[5])
    unit = concept_direction(nla, "whatever")
    expected = normalized(ds.vectors()[5]) - nla.mean_vector
    assert torch.allclose(unit, expected / expected.norm(), atol=1e-5)
    result = steer(nla, "whatever", "The cat sat on the", [0.0, 0.5, 2.0, 8.0], max_new_tokens=5, av_new_tokens=4)
    rows = result["rows"]
    assert [r["scale"] for r in rows] == [0.0, 0.5, 2.0, 8.0]
    along = [r["state_concept"] for r in rows]
    assert along == sorted(along) and along[0] < 0.5 * along[-1]
    # A huge step makes the state the concept direction itself: x̂ → sqrt(d)·u.
    limit = 1.0 - float(nla.mean_vector @ unit) / nla.meta.d_model ** 0.5
    assert along[-1] == pytest.approx(limit, abs=0.05)
    # Scale 0 is the unsteered model: its generation is plain greedy decoding.
    ids = nla.tokenizer.encode("The cat sat on the", add_special_tokens=True)
    with torch.no_grad():
        from nla.eval.causal import base_lm

        with base_lm(nla) as model:
            plain = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=nla.tokenizer.pad_token_id)
    assert rows[0]["generation"] == nla.tokenizer.decode(plain[0, len(ids):], skip_special_tokens=True)
    assert all(r["av_explanation"] is not None for r in rows)
    table = dose_response_table(result)
    assert table.count("\n| ") == 1 + len(rows)  # header + one line per scale


def test_steer_cli_and_bad_scales(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, bundle = setup
    assert main(["steer", "--nla", str(bundle), "loops", "--prompt", "for i in", "--scale", "0,1",
                 "--max-new-tokens", "3", "--av-new-tokens", "3", "--device", "cpu"]) == 0
    assert "| 1 |" in capsys.readouterr().out
    with pytest.raises(Exception, match="expected comma-separated numbers"):
        parse_scales("1,abc")
    assert main(["steer", "--nla", str(bundle), "loops", "--prompt", "x", "--scale", "nan"]) == 2
    assert "scales must be finite" in capsys.readouterr().err
    assert main(["steer", "--nla", str(bundle), "loops", "--prompt", "x", "--max-new-tokens", "0", "--device", "cpu"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_steer_chat_prompt_uses_the_template(setup: tuple[Path, Path]) -> None:
    _, bundle = setup
    nla = NLA.from_pretrained(bundle, device="cpu")
    plain = steer(nla, "loops", "What is a list?", [0.0], max_new_tokens=4, verbalize=False)
    chat = steer(nla, "loops", "What is a list?", [0.0], max_new_tokens=4, verbalize=False, chat=True)
    assert chat["chat"] and not plain["chat"]
    # The state read at the last prompt token differs: the chat prompt ends in the assistant header.
    assert chat["rows"][0]["state_concept"] != pytest.approx(plain["rows"][0]["state_concept"], abs=1e-6)
    assert chat["rows"][0]["av_explanation"] is None


def test_search_endpoint(setup: tuple[Path, Path]) -> None:
    data, bundle = setup
    nla = NLA.from_pretrained(bundle, device="cpu")
    index = SearchIndex.open(data)
    want = search(nla, index, "strings and lists", k=4)
    with running_server(create_app(nla, ServeConfig(data=str(data), torch_threads=1))) as url:
        r = httpx.post(url + "/v1/search", json={"text": "strings and lists", "k": 4})
        assert r.status_code == 200
        assert [h["row"] for h in r.json()["hits"]] == [h["row"] for h in want]
        assert httpx.get(url + "/v1/info").json()["search_dataset"] == str(data)
        bad = httpx.post(url + "/v1/search", json={"text": "x", "k": 1000})
        assert bad.status_code == 422 and "k=1000" in bad.json()["detail"]
        assert httpx.post(url + "/v1/search", json={"text": "  "}).status_code == 422
    with running_server(create_app(nla, ServeConfig(torch_threads=1))) as url:
        r = httpx.post(url + "/v1/search", json={"text": "loops"})
        assert r.status_code == 422 and "--data" in r.json()["detail"]


def test_search_and_steer_device_defaults_to_auto_and_refuses_a_missing_gpu(
        setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`--device` defaults to `auto` (as in every other command) and a device that is not there is
    one line on stderr (nla.config.check_device), before any bundle is loaded."""
    import argparse

    from nla.cli import build_parser

    data, bundle = setup
    parser = build_parser([])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("search", "steer"):
        device = next(a for a in sub.choices[name]._actions if "--device" in a.option_strings)
        assert device.default == "auto", name
    # On a GPU machine, name an index past the last device instead of a CUDA that is missing.
    dev = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    commands = [["search", "--nla", str(bundle), "--data", str(data), "--device", dev, "loops"],
                ["steer", "--nla", str(bundle), "loops", "--prompt", "x", "--device", dev]]
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "requested but" in err and "--device" in err, err
