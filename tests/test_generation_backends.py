"""`--generation-backend transformers|vllm` for `nla eval` and `nla serve` (issue 20 item 5).

The transformers backend runs for real on tiny models and must answer exactly as the call eval
and serve made before the interface (``nla.verbalize``). vLLM cannot run here (no GPU, no
vllm): its missing-package, too-old and no-GPU paths are run for real, and our side of the
engine is checked against the transformers path with a stand-in ``vllm`` module (below) that
only exists because vLLM itself cannot run on CPU.

What the vLLM side builds follows vLLM's public code:

* ``vllm/entrypoints/llm.py``: ``LLM(model, enable_prompt_embeds=True, ...)``;
  ``LLM.generate(prompts, sampling_params, *, use_tqdm, lora_request)`` with one
  ``SamplingParams`` per prompt, outputs "in the same order as the input prompts";
* ``examples/offline_inference/prompt_embed_inference.py``: a prompt is ``{"prompt_embeds": e}``
  with ``e`` the ``[T, d]`` output of the model's input embedding;
* ``vllm/sampling_params.py``: ``temperature`` 0 is greedy and then ``n`` must be 1
  (``_verify_greedy_sampling``), ``temperature`` in [0, 2], ``top_k`` -1 (or 0) is no cut;
* ``vllm/v1/engine/parallel_sampling.py``: a seeded request's ``n`` children sample with
  ``seed + index``, and ``CompletionOutput.index`` is the child's place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from nla.bundle import NLA, LoraSettings
from nla.errors import NLAError
from nla.train import generation
from nla.train.generation import (
    MIN_VLLM,
    TransformersBackend,
    VLLMBackend,
    build_prompt_embeds,
    check_backend,
    check_vllm_available,
    inference_backend,
    verbalizations_from_vllm,
    verbalize_requests,
)

REPO = Path(__file__).resolve().parents[1]
FAST_EVAL = ["--max-rows", "6", "--max-new-tokens", "6", "--best-of", "2", "--bootstrap", "0", "--no-probes",
             "--no-causal", "--no-progress", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def lora_bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny:llama LoRA bundle whose answers depend on the vector: random B factors large
    enough that a tiny random model stops writing one token whatever it is shown."""
    nla = NLA.initialize(dataset=str(tiny_dataset), lora=LoraSettings(r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in nla.av_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("backends") / "bundle"
    nla.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nla(lora_bundle: Path) -> NLA:
    return NLA.from_pretrained(lora_bundle, device="cpu")


def _vectors(nla: NLA, n: int, seed: int = 1) -> torch.Tensor:
    return 3 * torch.randn(n, nla.meta.d_model, generator=torch.Generator().manual_seed(seed))


def _same(a: list[list[Any]], b: list[list[Any]]) -> None:
    assert [[(v.explanation, v.raw, v.truncated, v.token_ids) for v in row] for row in a] == \
           [[(v.explanation, v.raw, v.truncated, v.token_ids) for v in row] for row in b]


# ---------------------------------------------------------------- transformers, for real
def test_transformers_backend_answers_as_nla_verbalize(nla: NLA) -> None:
    """Greedy and seeded sampling through the backend = the call eval and serve made before."""
    torch.set_num_threads(1)
    backend = TransformersBackend(nla.verbalizer)
    vecs = _vectors(nla, 3)
    _same(backend.verbalize(vecs, n=1, max_new_tokens=6, batch_size=2),
          nla.verbalize(vecs, n=1, max_new_tokens=6, batch_size=2))
    kw: dict[str, Any] = dict(n=2, max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9, batch_size=4, seed=7)
    sampled = backend.verbalize(vecs, **kw)
    _same(sampled, nla.verbalize(vecs, **kw))
    assert len({tuple(v.token_ids) for row in sampled for v in row}) > 1  # really sampled


def test_eval_samples_are_unchanged_through_the_backend(lora_bundle: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """A tiny-model eval (greedy round trip and best-of-2 sampling) gives the same samples and
    metrics through ``--generation-backend transformers`` as through ``nla.verbalize``."""
    from nla.data.store import ActivationDataset
    from nla.eval.suite import EvalConfig, evaluate

    torch.set_num_threads(1)
    cfg = EvalConfig(nla=str(lora_bundle), data=str(tiny_dataset), out=str(tmp_path), max_rows=6, max_new_tokens=6,
                     best_of=2, bootstrap=0, probes=False, causal=False, progress=False, device="cpu", batch_size=4)
    ds = ActivationDataset.open(tiny_dataset)
    model = NLA.from_pretrained(lora_bundle, device="cpu")
    model.merge_adapters()  # as run_eval
    before = evaluate(model, ds, cfg)  # no backend: nla.verbalize, the call eval made before
    after = evaluate(model, ds, cfg, backend=TransformersBackend(model.verbalizer))
    assert after.samples == before.samples
    for m in (before.metrics, after.metrics):
        m.pop("timing_s"), m.pop("created")
    assert after.metrics == before.metrics
    assert before.samples[0]["best_of_k_text"] is not None  # the sampled path ran too


# ---------------------------------------------------------------- vLLM cannot run here: its errors, for real
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nla.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_eval_and_serve_without_vllm_are_one_line_errors(lora_bundle: Path, tiny_dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The commands docs/scaling.md gives for vLLM eval and serve, on a machine without vLLM or
    a GPU: one line, exit status 2, nothing written."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only where vLLM is installed
        pytest.fail("this test checks the missing-package path; vLLM is installed here")
    out = tmp_path / "report"
    for proc in (_cli("eval", "--nla", str(lora_bundle), "--data", str(tiny_dataset), "--out", str(out),
                      "--generation-backend", "vllm", "--dtype", "bfloat16"),
                 _cli("serve", "--nla", str(lora_bundle), "--generation-backend", "vllm")):
        err = proc.stderr.strip()
        assert proc.returncode == 2, err[-2000:]
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        need = ".".join(map(str, MIN_VLLM))
        assert f"vLLM is not installed (pip install 'vllm>={need}'), use --generation-backend transformers" in err
    assert not out.exists()
    from nla.cli import main

    assert main(["eval", "--nla", str(lora_bundle), "--data", str(tiny_dataset), "--out", str(out),
                 "--generation-backend", "hf"]) == 2
    assert "--generation-backend: expected one of transformers, vllm, got 'hf'" in capsys.readouterr().err


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, version: str, llm: Any = None, params: Any = None) -> None:
    mod = types.ModuleType("vllm")
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.LLM = llm  # type: ignore[attr-defined]
    mod.SamplingParams = params  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = StandInLoRARequest  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)


def test_too_old_vllm_or_no_gpu_is_one_line(monkeypatch: pytest.MonkeyPatch, lora_bundle: Path, tiny_dataset: Path,
                                             tmp_path: Path) -> None:
    from nla.eval.suite import EvalConfig, run_eval

    _fake_vllm(monkeypatch, "0.10.2")
    with pytest.raises(NLAError, match=r"needs vLLM >= 0\.11\.0 .*found 0\.10\.2"):
        check_backend("vllm")
    _fake_vllm(monkeypatch, "0.11.0")
    monkeypatch.setattr(generation, "cuda_visible", lambda: False)  # as on this machine, on any machine
    with pytest.raises(NLAError, match="needs a CUDA GPU and none is visible here; use --generation-backend transformers"):
        check_vllm_available()
    out = tmp_path / "r"
    with pytest.raises(NLAError, match="needs a CUDA GPU"):
        run_eval(EvalConfig(nla=str(lora_bundle), data=str(tiny_dataset), out=str(out), generation_backend="vllm",
                            device="cpu"))
    assert not out.exists()  # refused before the report folder
    with pytest.raises(NLAError, match="unknown generation backend 'hf'"):
        check_backend("hf")


# ---------------------------------------------------------------- our side of vLLM
@dataclass
class StandInSamplingParams:
    """Records what we ask for, and refuses what vllm/sampling_params.py refuses."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if self.temperature < 1e-5 and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.top_k < -1 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("bad top_k/top_p")


@dataclass
class StandInLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class StandInLLM:
    """Stands in for ``vllm.LLM`` where vLLM cannot run: loads the model folder we export with
    transformers, applies the adapter of a ``LoRARequest`` with PEFT, and decodes from the
    prompt embeddings (greedy at temperature 0, else sampling seeded ``seed + index``). Like
    vLLM it leaves a special stop token out of ``token_ids`` and names it in ``stop_reason``."""

    instances: ClassVar[list[StandInLLM]] = []

    def __init__(self, **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = kwargs
        self.base = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=getattr(torch, kwargs["dtype"]))
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        self.calls: list[tuple[list[dict[str, torch.Tensor]], list[Any]]] = []
        StandInLLM.instances.append(self)

    def _model(self, lora_request: Any) -> Any:
        if lora_request is None:
            return self.base
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, lora_request.lora_path)

    def generate(self, prompts: list[dict[str, torch.Tensor]], params: list[Any], *, lora_request: Any = None,
                 use_tqdm: bool = True) -> list[Any]:
        self.calls.append((prompts, params))
        model = self._model(lora_request)
        special = set(self.tokenizer.all_special_ids)
        outs = []
        for prompt, p in zip(prompts, params):
            e = prompt["prompt_embeds"]
            comps = []
            for index in range(p.n):
                kw: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
                if p.temperature > 0:
                    torch.manual_seed(p.seed + index)
                    kw = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": 0}
                with torch.no_grad():
                    ids = model.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long),
                                         max_new_tokens=p.max_tokens, eos_token_id=p.stop_token_ids,
                                         pad_token_id=p.stop_token_ids[0], **kw)[0].tolist()
                stop = next((k for k, t in enumerate(ids) if t in p.stop_token_ids), None)
                if stop is None:
                    comps.append(types.SimpleNamespace(index=index, token_ids=ids, finish_reason="length",
                                                       stop_reason=None))
                else:
                    hit = ids[stop]
                    kept = ids[:stop] if hit in special else ids[: stop + 1]
                    comps.append(types.SimpleNamespace(index=index, token_ids=kept, finish_reason="stop",
                                                       stop_reason=hit))
            outs.append(types.SimpleNamespace(outputs=list(reversed(comps))))  # any order: .index says which
        if lora_request is not None:
            model.unload()  # the base stays the base for the next request
        return outs


@pytest.fixture()
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> type[StandInLLM]:
    _fake_vllm(monkeypatch, "0.11.0", StandInLLM, StandInSamplingParams)
    # The stand-in runs on CPU; vLLM's own GPU requirement is what the test above checks.
    monkeypatch.setattr(generation, "cuda_visible", lambda: True)
    StandInLLM.instances = []
    return StandInLLM


def test_requests_carry_the_injected_embeddings_greedy_and_seeded(nla: NLA) -> None:
    """The prompt embeddings we send are what the transformers path's first block receives
    (the embedding output after the injection hook); greedy is temperature 0 with n=1,
    sampling is n per request, seeded per vector."""
    vb = nla.verbalizer
    vecs = _vectors(nla, 3, seed=4)
    seen: list[torch.Tensor] = []

    def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:  # the prefill, not a cached decoding step
            seen.append(hidden.detach().clone())

    from nla.models.layers import decoder_blocks

    handle = decoder_blocks(nla.av_model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        TransformersBackend(vb).verbalize(vecs, max_new_tokens=2, batch_size=3)
    finally:
        handle.remove()
    embeds = build_prompt_embeds(vb, vecs)
    assert len(seen) == 1 and torch.allclose(seen[0], embeds, atol=1e-6)

    stop = list(vb.end_ids)
    prompts, greedy = verbalize_requests(embeds, 4, max_new_tokens=5, do_sample=False, temperature=1.0, top_p=0.5,
                                         seed=None, stop_ids=stop, sampling_params=StandInSamplingParams)
    assert [p["prompt_embeds"].shape for p in prompts] == [embeds.shape[1:]] * 3
    assert all(torch.equal(p["prompt_embeds"], e) for p, e in zip(prompts, embeds))
    assert {(g.n, g.temperature, g.max_tokens, tuple(g.stop_token_ids)) for g in greedy} == {(1, 0.0, 5, tuple(stop))}
    _, sampled = verbalize_requests(embeds, 4, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=11,
                                    stop_ids=stop, sampling_params=StandInSamplingParams)
    assert {(s.n, s.temperature, s.top_p, s.top_k) for s in sampled} == {(4, 0.7, 0.9, -1)}
    seeds = [s.seed for s in sampled]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)
    _, again = verbalize_requests(embeds, 4, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=11,
                                  stop_ids=stop, sampling_params=StandInSamplingParams)
    assert [s.seed for s in again] == seeds  # the same call samples the same
    _, unseeded = verbalize_requests(embeds, 2, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=1.0,
                                     seed=None, stop_ids=stop, sampling_params=StandInSamplingParams)
    assert {s.seed for s in unseeded} == {None}
    with pytest.raises(NLAError, match=r"temperatures in \(0, 2\], got 3"):
        verbalize_requests(embeds, 2, max_new_tokens=5, do_sample=True, temperature=3.0, top_p=1.0, seed=None,
                           stop_ids=stop, sampling_params=StandInSamplingParams)


def test_vllm_outputs_become_group_major_verbalizations(nla: NLA) -> None:
    vb = nla.verbalizer
    end = vb.end_ids[0]
    text = vb.tokenizer.encode("<explanation>loops</explanation>", add_special_tokens=False)

    def comp(index: int, ids: list[int], reason: str, stop: int | None = None) -> Any:
        return types.SimpleNamespace(index=index, token_ids=ids, finish_reason=reason, stop_reason=stop)

    outs = [types.SimpleNamespace(outputs=[comp(1, text[:3], "length"), comp(0, [*text], "stop", end)]),
            types.SimpleNamespace(outputs=[comp(0, [*text, end], "stop", end), comp(1, [], "stop", end)])]
    got = verbalizations_from_vllm(vb, outs, 2)
    assert [[v.explanation for v in row] for row in got] == [["loops", None], ["loops", None]]
    assert got[0][0].token_ids == text and not got[0][0].truncated  # the stop token is not text
    assert got[0][1].truncated and got[0][1].token_ids == text[:3]  # cut by max_tokens, in index order
    assert got[1][1].raw == "" and not got[1][1].truncated  # stopped at once: finished, empty
    greedy = verbalizations_from_vllm(vb, [types.SimpleNamespace(outputs=[comp(0, [*text], "stop", end)])], 3)
    assert [v.explanation for v in greedy[0]] == ["loops"] * 3  # one greedy answer stands for n
    greedy[0][0].token_ids.append(-1)
    assert greedy[0][1].token_ids == text  # copies, not one shared list
    with pytest.raises(NLAError, match="returned 2 answers for a vector, 3 were asked for"):
        verbalizations_from_vllm(vb, outs[:1], 3)


def test_vllm_backend_through_a_stand_in_engine_answers_as_transformers(nla: NLA,
                                                                        stand_in_vllm: type[StandInLLM]) -> None:
    """A LoRA bundle as serve loads it: the exported folder holds the base weights, the adapter
    goes as a LoRARequest, and greedy answers equal the transformers backend's."""
    torch.set_num_threads(1)
    backend = inference_backend("vllm", nla, gpu_memory_utilization=0.5)
    assert isinstance(backend, VLLMBackend)
    (engine,) = stand_in_vllm.instances
    assert engine.kwargs["enable_prompt_embeds"] is True and engine.kwargs["enable_lora"] is True
    assert engine.kwargs["max_lora_rank"] == 8 and engine.kwargs["dtype"] == "float32"
    assert engine.kwargs["gpu_memory_utilization"] == 0.5
    vecs = _vectors(nla, 3, seed=5)
    want = TransformersBackend(nla.verbalizer).verbalize(vecs, n=2, max_new_tokens=6)
    assert len({tuple(row[0].token_ids) for row in want}) > 1  # the vector matters: equality below means something
    _same(backend.verbalize(vecs, n=2, max_new_tokens=6), want)
    prompts, params = engine.calls[-1]
    assert len(prompts) == 3 and {p.n for p in params} == {1}  # greedy: one request per vector, n=1
    sampled = backend.verbalize(vecs, n=3, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    assert [len(row) for row in sampled] == [3, 3, 3]
    assert _ids(backend.verbalize(vecs, n=3, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)) == \
           _ids(sampled)  # seeded: the same call samples the same


def _ids(rows: list[list[Any]]) -> list[list[list[int]]]:
    return [[v.token_ids for v in row] for row in rows]


def test_eval_with_vllm_through_the_stand_in_writes_the_transformers_answers(
        lora_bundle: Path, tiny_dataset: Path, tmp_path: Path, stand_in_vllm: type[StandInLLM]) -> None:
    """`nla eval --generation-backend vllm` (docs/scaling.md): greedy samples equal the
    transformers run's; the cache keeps the two backends' answers apart."""
    from nla.cli import main

    torch.set_num_threads(1)
    ref, got = tmp_path / "transformers", tmp_path / "vllm"
    assert main(["eval", "--nla", str(lora_bundle), "--data", str(tiny_dataset), "--out", str(ref), *FAST_EVAL]) == 0
    assert main(["eval", "--nla", str(lora_bundle), "--data", str(tiny_dataset), "--out", str(got), *FAST_EVAL,
                 "--generation-backend", "vllm", "--vllm-gpu-memory-utilization", "0.4"]) == 0
    (engine,) = stand_in_vllm.instances
    assert "enable_lora" not in engine.kwargs  # eval merges the adapter: the folder holds the AV itself

    def samples(report: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]

    a, b = samples(ref), samples(got)
    assert [s["av_raw"] for s in b] == [s["av_raw"] for s in a]
    assert len({s["av_raw"] for s in a}) > 1  # the answers depend on the row
    assert [s["truncated"] for s in b] == [s["truncated"] for s in a]
    assert all(s["best_of_k_text"] is not None for s in b)
    assert {p.name.split("-")[-1] for p in (ref / "cache").iterdir()}.isdisjoint(
        {p.name.split("-")[-1] for p in (got / "cache").iterdir()})


def test_serve_with_vllm_through_the_stand_in(nla: NLA, stand_in_vllm: type[StandInLLM]) -> None:
    """`nla serve --generation-backend vllm`: a real server on loopback answers /v1/verbalize
    with the transformers backend's greedy answers; a temperature vLLM refuses is a 422."""
    from nla.serve import APIError, Client, ServeConfig, create_app, running_server

    torch.set_num_threads(1)
    cfg = ServeConfig(nla="x", generation_backend="vllm", torch_threads=1, max_new_tokens=8, default_new_tokens=5)
    vecs = _vectors(nla, 2, seed=6)
    want = TransformersBackend(nla.verbalizer).verbalize(vecs, max_new_tokens=5)
    assert want[0][0].raw != want[1][0].raw
    with running_server(create_app(nla, cfg)) as url, Client(url) as client:
        assert client.info()["generation_backend"] == "vllm"
        out = client.verbalize(vecs, max_new_tokens=5)
        assert [r["samples"][0]["raw"] for r in out["results"]] == [row[0].raw for row in want]
        with pytest.raises(APIError, match=r"temperature=3\.0 is out of range \(0, 2\]"):
            client.verbalize(vecs[:1], n=2, temperature=3.0)
    assert len(stand_in_vllm.instances) == 1
