"""`nla publish` on tiny bundles: the model card parses with huggingface_hub offline (ModelCard,
model-index → EvalResult), carries the latest eval report's numbers, is right for full, LoRA
and universal bundles and for the embedded default's names; a published folder re-imports
with `nla import` to an identical bundle; `--push` goes through huggingface_hub's upload API
(to a local hub stand-in on 127.0.0.1) with the token from the environment, never written.

Card format: huggingface_hub ``repocard.py`` / ``repocard_data.py`` (huggingface/huggingface_hub,
``src/huggingface_hub/repocard_data.py``: ``ModelCardData``, ``model_index_to_eval_results``);
upload: ``hf_api.py`` (``create_repo``, ``upload_folder``: validate-yaml, preupload, commit).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_dataset
from huggingface_hub import ModelCard

from nla.bundle import NLA, LoraSettings
from nla.cli import main
from nla.meta import read_yaml
from nla.publish import BUNDLE_MEMBERS, render_card

FAST = ["--max-new-tokens", "6", "--best-of", "0", "--bootstrap", "20", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `nla run`-like work folder: data/, sft/ (full bundle), lora/ (LoRA bundle), eval/ (report of sft)."""
    from nla.label.runner import LabelConfig, label

    root = tmp_path_factory.mktemp("publish")
    data = make_dataset(root / "data", docs=12, split="av_sft=0.2,ar_sft=0.4,rl=0.1,eval=0.3")
    label(LabelConfig(data=str(data), teacher="lens", device="cpu", progress=False))
    full = NLA.initialize(dataset=data, device="cpu")
    full.meta.training = {"av_sft": {"steps": 3, "lr": 1e-4}, "ar_sft": {"steps": 3, "lr": 1e-4}}
    full.save_pretrained(root / "sft")
    (root / "sft" / "checkpoints" / "step-3").mkdir(parents=True)  # training leftovers: never published
    (root / "sft" / "checkpoints" / "step-3" / "trainer_state.json").write_text("{}")
    NLA.initialize(dataset=data, device="cpu", lora=LoraSettings(r=4, alpha=8)).save_pretrained(root / "lora")
    assert main(["eval", "--nla", str(root / "sft"), "--data", str(data), "--out", str(root / "eval"), *FAST]) == 0
    return root


def _canonical(obj: Any) -> Any:
    """PEFT writes ``target_modules`` from a Python set: its order varies from process to process."""
    if isinstance(obj, dict):
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else _canonical(v) for k, v in obj.items()}
    return obj


def assert_same_bundle(a: Path, b: Path) -> None:
    """Same files; equal sidecars, JSON configs and tensors (values, not bytes: safetensors
    headers may order keys differently)."""
    from safetensors.torch import load_file

    def files(root: Path) -> set[str]:  # the bundle's own files (a training folder also holds checkpoints)
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                and p.relative_to(root).parts[0] in BUNDLE_MEMBERS}

    assert files(a) == files(b)
    for rel in sorted(files(a)):
        fa, fb = a / rel, b / rel
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(fa)), load_file(str(fb))
            assert ta.keys() == tb.keys(), rel
            assert all(torch.equal(ta[k], tb[k]) for k in ta), rel
        elif rel.endswith(".yaml"):
            assert read_yaml(fa) == read_yaml(fb), rel
        elif rel.endswith(".json"):
            assert _canonical(json.loads(fa.read_text())) == _canonical(json.loads(fb.read_text())), rel
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel


def test_card_parses_and_carries_the_report(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    assert main(["publish", str(work / "sft"), "--out", str(out), "--name", "tiny-nla"]) == 0
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["library_name"] == "nla" and data["license"] == "other"  # tiny:llama has no hub id or licence
    assert "base_model" not in data  # a tiny test model is not on the hub
    assert {"nla", "interpretability", "layer-2", "full"} <= set(data["tags"])
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    results = {(r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("nla-round-trip", "fve_nrm")] == pytest.approx(metrics["round_trip"]["fve_nrm"], abs=1e-6)
    assert results[("nla-reconstruction", "fve_nrm")] == pytest.approx(metrics["ar_alone"]["fve_nrm"], abs=1e-6)
    assert results[("nla-causal-faithfulness", "kl_fraction_recovered")] == pytest.approx(
        metrics["causal"]["fraction_recovered"], abs=1e-6)
    text = card.text
    for section in ("## Results", "### Baselines", "### Faithfulness probes", "### Causal faithfulness", "## Training",
                    "## Known limits", "## How to load"):
        assert section in text
    assert f"{metrics['baselines']['mean_direction']['fve_nrm']:.3f}" in text
    assert "`av_sft`: steps = 3" in text and "NLA.from_pretrained(path)" in text
    assert json.loads((out / "eval" / "metrics.json").read_text()) == metrics
    assert not (out / "checkpoints").exists()


def test_published_folder_reimports_identically(work: Path, tmp_path: Path) -> None:
    for kind in ("sft", "lora"):
        out = tmp_path / f"pub-{kind}"
        assert main(["publish", str(work / kind), "--out", str(out)]) == 0
        back = tmp_path / f"back-{kind}"
        assert main(["import", str(out), "--out", str(back), "--device", "cpu"]) == 0
        assert_same_bundle(work / kind, back)
    lora_card = ModelCard.load(tmp_path / "pub-lora" / "README.md")
    assert {"lora", "peft"} <= set(lora_card.data.tags)
    assert "eval_results" not in lora_card.data.to_dict() or not lora_card.data.eval_results  # no report of lora
    assert "No `nla eval` report was found" in lora_card.text and "PeftModel.from_pretrained" in lora_card.text


def test_universal_and_embedded_default_cards(work: Path) -> None:
    meta = read_yaml(work / "sft" / "nla_meta.yaml")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    default = dict(meta, base_model="smollm2-135m")
    card = ModelCard(render_card(default, metrics, "smollm2-nla"), ignore_metadata_errors=False)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    uni = dict(meta, extra={"universal": {"d_shared": 64, "anchor": "smollm2-135m", "tags": ["smollm2-135m", "gemma3-270m"],
                                          "models": {"smollm2-135m": {"model": "smollm2-135m", "layer": 20, "trained": True},
                                                     "gemma3-270m": {"model": "gemma3-270m", "layer": 12, "trained": False}}}})
    ucard = ModelCard(render_card(uni, None, "universal-nla"), ignore_metadata_errors=False)
    assert ucard.data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"]
    assert "universal" in ucard.data.tags and "UniversalNLA.from_pretrained" in ucard.text
    assert "`gemma3-270m` = gemma3-270m layer 12, held out" in ucard.text
    hub = ModelCard(render_card(dict(meta, base_model="org/model"), None, "x"), ignore_metadata_errors=False)
    assert hub.data.base_model == "org/model"


@pytest.fixture()
def hub() -> Iterator[dict[str, Any]]:
    """A stand-in for the hub's upload endpoints on 127.0.0.1 (tests have no internet): it
    answers create-repo, validate-yaml (with huggingface_hub's own ModelCard parser),
    preupload (everything as a regular git blob) and commit, and records what it received."""
    seen: dict[str, Any] = {"requests": [], "files": {}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen["requests"].append((self.path, self.headers.get("authorization")))
            if self.path == "/api/repos/create":
                d = json.loads(raw)
                return self.reply(200, {"url": f"{seen['url']}/{d.get('organization')}/{d['name']}"})
            if self.path == "/api/validate-yaml":
                try:
                    ModelCard(json.loads(raw)["content"], ignore_metadata_errors=False)
                except Exception as exc:
                    return self.reply(400, {"errors": [{"message": str(exc)}]})
                return self.reply(200, {"warnings": []})
            if "/preupload/" in self.path:
                files = json.loads(raw)["files"]
                return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if "/commit/" in self.path:
                for line in raw.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        seen["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                return self.reply(200, {"commitUrl": f"{seen['url']}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                        "pullRequestUrl": None})
            return self.reply(404, {"error": f"no route {self.path}"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    seen["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen
    server.shutdown()
    server.server_close()


def test_push_uploads_with_the_environment_token(work: Path, tmp_path: Path, hub: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the stand-in is local
    out = tmp_path / "pub"
    monkeypatch.delenv("NLA_TEST_HUB_TOKEN", raising=False)
    assert main(["publish", str(work / "sft"), "--out", str(out), "--push", "me/tiny-nla",
                 "--token-env", "NLA_TEST_HUB_TOKEN", "--endpoint", hub["url"]]) == 2
    assert "NLA_TEST_HUB_TOKEN" in capsys.readouterr().err and not hub["requests"]
    secret = "hf_test_secret_1234567890"
    monkeypatch.setenv("NLA_TEST_HUB_TOKEN", secret)
    assert main(["publish", str(work / "sft"), "--out", str(out), "--push", "me/tiny-nla", "--force",
                 "--token-env", "NLA_TEST_HUB_TOKEN", "--endpoint", hub["url"]]) == 0
    printed = capsys.readouterr()
    assert "pushed to me/tiny-nla" in printed.out and secret not in printed.out + printed.err
    paths = [p for p, _ in hub["requests"]]
    assert paths[0] == "/api/repos/create" and "/api/validate-yaml" in paths and paths[-1].endswith("/commit/main")
    assert all(auth == f"Bearer {secret}" for _, auth in hub["requests"])
    local = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(hub["files"]) == local
    assert hub["files"]["README.md"] == (out / "README.md").read_bytes()
    for p in out.rglob("*"):  # the token is never written
        if p.is_file():
            assert secret.encode() not in p.read_bytes()
    # The card the hub received names the repo in its loading snippet.
    assert 'snapshot_download("me/tiny-nla")' in hub["files"]["README.md"].decode()


def test_bad_input(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", str(work / "data"), "--out", str(tmp_path / "a")]) == 2
    assert main(["publish", str(work / "sft"), "--out", str(work / "sft" / "inside")]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["publish", str(work / "sft"), "--out", str(busy)]) == 2
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(["publish", str(work / "sft"), "--out", str(tmp_path / "b"), "--eval", str(tmp_path / "none")]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("nla publish: error:")]
    assert len(err) == 4


def _snippet(card_text: str) -> str:
    """The last Python block of the card: the load-without-nla code."""
    blocks = card_text.split("```python\n")
    return blocks[-1].split("```")[0]


@pytest.mark.parametrize("kind", ["sft", "lora"])
def test_load_without_nla_snippet_matches_nla(work: Path, tmp_path: Path, kind: str) -> None:
    """The card's transformers-only code gives the AR's vectors and the AV's greedy text."""
    out = tmp_path / "pub"
    assert main(["publish", str(work / kind), "--out", str(out)]) == 0
    code = _snippet((out / "README.md").read_text())
    if kind == "lora":  # the tiny base is not on the hub: point the snippet at its local folder
        from nla.models.loading import resolve_model_path

        code = code.replace('"tiny:llama"', json.dumps(str(resolve_model_path("tiny:llama"))))
    scope: dict[str, Any] = {"path": str(out)}
    exec(compile(code, "card-snippet", "exec"), scope)  # our own generated card, run as a reader would
    nla = NLA.from_pretrained(out, device="cpu")
    text = "The model is reading Python code."
    with torch.no_grad():
        assert torch.allclose(scope["reconstruct"](text), nla.reconstruct([text])[0], atol=1e-4)
        v = torch.randn(nla.meta.d_model, generator=torch.Generator().manual_seed(0))
        want = nla.verbalize(v.unsqueeze(0), max_new_tokens=12)[0][0]
        got = scope["verbalize"](v)
    # Greedy decoding: the card's 96 tokens begin with nla's 12 (or both stop at the same end token).
    assert len(want.token_ids) >= 3 and got.startswith(want.raw)


def test_universal_bundle_publishes_whole(work: Path, tmp_path: Path) -> None:
    """A universal bundle's adapters/ travel with it and the folder loads back as the same
    universal NLA (UniversalNLA.from_pretrained → save_pretrained gives identical files)."""
    from torch import nn

    from nla.universal.bundle import UniversalNLA

    nla = NLA.from_pretrained(work / "sft", device="cpu")
    gen = torch.Generator().manual_seed(0)
    enc, dec = nn.Linear(32, nla.meta.d_model, bias=False), nn.Linear(nla.meta.d_model, 32, bias=False)
    enc.weight.data = torch.randn(enc.weight.shape, generator=gen)
    dec.weight.data = torch.randn(dec.weight.shape, generator=gen)
    models = {"tiny-llama": {"model": "tiny:llama", "layer": 2, "d_model": nla.meta.d_model, "trained": True},
              "tiny-gpt2": {"model": "tiny:gpt2", "layer": 2, "d_model": 32, "trained": False}}
    uni = UniversalNLA(nla, "tiny-llama", {"tiny-gpt2": (enc, dec)}, models)
    uni.save_pretrained(tmp_path / "uni")
    out = tmp_path / "pub"
    assert main(["publish", str(tmp_path / "uni"), "--out", str(out)]) == 0
    assert (out / "adapters" / "tiny-gpt2" / "enc.safetensors").exists()
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    assert "universal" in card.data.tags and "`tiny-gpt2` = tiny:gpt2 layer 2, held out" in card.text
    UniversalNLA.from_pretrained(out, device="cpu").save_pretrained(tmp_path / "back")
    assert_same_bundle(tmp_path / "uni", tmp_path / "back")
    # `nla import` keeps the per-model maps too (a plain NLA would drop adapters/)
    assert main(["import", str(out), "--out", str(tmp_path / "imported"), "--device", "cpu"]) == 0
    assert_same_bundle(tmp_path / "uni", tmp_path / "imported")
