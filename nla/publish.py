"""`nla publish RUN --out DIR [--push REPO]`: a bundle made ready for the Hugging Face hub.

``DIR`` gets the bundle's own files (sidecar, μ, ``av/``, ``ar/``, and ``adapters/`` for a
universal bundle; never training checkpoints or logs), the latest eval report's
``metrics.json`` under ``eval/``, and a ``README.md`` model card: YAML front matter
(``base_model``, ``library_name``, ``tags``, ``license``, ``datasets`` when the corpus is a hub
dataset, and the ``model-index`` of that report) and a body saying how it was trained, what
it scores against its baselines and probes, its known limits, and how to load it with and
without ``nla``. The card is parsed back with ``huggingface_hub.ModelCard`` before the folder
is swapped into place, so a card the hub would refuse never gets written.

``--push`` uploads the folder with ``huggingface_hub``'s own ``HfApi.create_repo`` and
``upload_folder``; the token is read from the environment variable named by ``--token-env``
(default ``HF_TOKEN``) and handed to the API call, never written to disk or printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from nla.errors import NLAError
from nla.meta import META_NAME, read_sidecar, read_yaml

# Bundle members a published folder carries (see nla/bundle.py and docs/universal.md).
BUNDLE_MEMBERS = (META_NAME, "mean_vector.safetensors", "av", "ar", "adapters")
# The hub ids of the embedded models (nla/models/loading.py) and their licences.
HUB_IDS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
           "gemma3-270m": ("google/gemma-3-270m", "gemma")}
REPORT_SEARCH_DEPTH = 2


# --------------------------------------------------------------------------- inputs
def find_report(run: Path) -> Path | None:
    """The newest `nla eval` report whose ``bundle.path`` is ``run``: inside it, or in a folder
    next to it (the `nla run` layout puts WORK/eval beside WORK/sft and WORK/rl)."""
    target = run.resolve()
    candidates: list[Path] = []
    for base in (run, run.parent):
        for depth in range(1, REPORT_SEARCH_DEPTH + 1):
            candidates += base.glob("/".join(["*"] * depth) + "/metrics.json")
    best: tuple[float, Path] | None = None
    for f in set(candidates):
        try:
            m = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        path = (m.get("bundle") or {}).get("path") if isinstance(m, dict) else None
        if m.get("kind") != "nla_eval" or not path or Path(path).resolve() != target:
            continue
        if best is None or f.stat().st_mtime > best[0]:
            best = (f.stat().st_mtime, f.parent)
    return best[1] if best else None


def hub_base_model(spec: str) -> str | None:
    """A hub id for ``base_model`` (an embedded name mapped, ``org/name`` as is), else None."""
    if spec in HUB_IDS:
        return HUB_IDS[spec][0]
    if spec.startswith(("tiny:", "/", ".")) or os.path.exists(spec) or spec.count("/") != 1:
        return None
    return spec


def _corpus(meta: dict[str, Any]) -> str | None:
    path = (meta.get("dataset") or {}).get("path")
    if path and (Path(path) / META_NAME).exists():
        corpus = read_yaml(Path(path) / META_NAME).get("corpus")
        return str(corpus) if corpus else None
    return None


def hub_dataset(corpus: str | None) -> str | None:
    """``hf:NAME[:CONFIG[:SPLIT]]`` corpora are hub datasets; local files and pydoc are not."""
    if corpus and corpus.startswith("hf:"):
        return corpus[3:].split(":")[0] or None
    return None


# --------------------------------------------------------------------------- card
def _fmt(x: Any, signed: bool = False) -> str:
    from nla.eval.report import fmt

    if isinstance(x, float) and signed:
        return f"{x:+.3f}"
    return fmt(x)


def _kind(meta: dict[str, Any]) -> str:
    if (meta.get("extra") or {}).get("universal"):
        return "universal"
    return "LoRA" if (meta.get("av") or {}).get("format") == "peft" else "full"


def _kind_note(kind: str, meta: dict[str, Any]) -> str:
    if kind == "LoRA":
        return " — `av/` and `ar/` are PEFT LoRA adapters over the base model, which is loaded separately."
    if kind == "full":
        return " — `av/` and `ar/` hold full weights."
    models = (meta["extra"]["universal"].get("models") or {}).items()
    listed = ", ".join(f"`{t}` = {(i or {}).get('model')} layer {(i or {}).get('layer')}"
                       + ("" if (i or {}).get("trained") else ", held out") for t, i in models)
    return (" — one AV/AR pair for several models, with a least-squares encoder/decoder per model under "
            f"`adapters/<tag>/` (models: {listed}).")


def card_metadata(meta: dict[str, Any], metrics: dict[str, Any] | None, name: str, *, license: str | None,
                  dataset: str | None) -> dict[str, Any]:
    from nla.eval.model_index import model_index

    kind = _kind(meta)
    bases = [meta["base_model"]]
    if kind == "universal":
        bases = [str((m or {}).get("model") or t) for t, m in (meta["extra"]["universal"].get("models") or {}).items()] or bases
    hub = [b for b in (hub_base_model(str(b)) for b in bases) if b]
    lic = license or next((HUB_IDS[b][1] for b in bases if b in HUB_IDS), None) or "other"
    data: dict[str, Any] = {
        "library_name": "nla",
        "license": lic,
        "tags": ["nla", "natural-language-autoencoder", "interpretability", "activation-verbalizer",
                 "activation-reconstructor", f"layer-{meta['layer_index']}", "lora" if kind == "LoRA" else kind,
                 *(["peft"] if kind == "LoRA" else [])],
    }
    if hub:
        data["base_model"] = hub[0] if len(hub) == 1 else hub
    if dataset:
        data["datasets"] = [dataset]
    if metrics is not None:
        ds = metrics.get("dataset") or {}
        data["model-index"] = model_index(name, metrics, dataset_name=f"{ds.get('split', 'eval')} split of {Path(str(ds.get('path', 'dataset'))).name}",
                                          dataset_type=dataset or "nla-activations")
    return data


def card_body(meta: dict[str, Any], metrics: dict[str, Any] | None, name: str, corpus: str | None, repo: str | None) -> str:
    from nla.eval.report import lookup

    kind = _kind(meta)
    k = meta["layer_index"]
    inj = meta["injection"]
    tokens = meta["tokens"]
    m = metrics or {}

    def g(path: str) -> Any:
        return lookup(m, path)

    lines = [f"# {name}: a Natural Language Autoencoder for `{meta['base_model']}`, layer {k}", "",
             f"A pair of fine-tuned models that translate the residual-stream activation of `{meta['base_model']}` at "
             f"layer {k} (the output of decoder block {k}, 0-based = `hidden_states[{k + 1}]`, d = {meta['d_model']}) "
             "into words and back:", "",
             "* **AV** (activation verbalizer): the base model fine-tuned to explain a vector injected at a marker token "
             f"of a fixed prompt ({inj['mode']} injection" + (f", scale {inj['scale']:g}" if inj["mode"] == "replace" else
                                                               f" at block {inj.get('layer')}, coef {inj.get('coef')}") + ");",
             f"* **AR** (activation reconstructor): blocks 0..{k} of the base model plus a `Linear(d, d)` value head, "
             "reading an explanation and returning the vector.", "",
             f"Bundle kind: **{kind}**" + _kind_note(kind, meta), "", "Made with [`nla`](https://pypi.org/project/nla/) " + str(meta.get("nla_version", "")) + ".", ""]

    lines += ["## Results", ""]
    if not metrics:
        lines += ["No `nla eval` report was found for this bundle; run `nla eval --nla RUN --data D --out REPORT` "
                  "and publish again with `--eval REPORT`.", ""]
    else:
        ds = m.get("dataset") or {}
        lines += [f"Held-out split `{ds.get('split')}` of `{Path(str(ds.get('path'))).name}`: {ds.get('rows_evaluated')} "
                  f"positions. `fve_nrm` is the headline (0 = no better than the training mean μ, 1 = perfect).", "",
                  "| | fve_nrm | 95 % interval | fve_meannorm | top-1 | shuffled gap |", "|---|---:|---:|---:|---:|---:|"]
        for label, path in [("Round trip AV → AR", "round_trip"), ("AR alone on teacher labels", "ar_alone"),
                            ("Best of k (oracle pick)", "round_trip.best_of_k")]:
            if g(path + ".fve_nrm") is None:
                continue
            ci = g(f"{path}.ci95.fve_nrm")
            ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) else "—"
            lines.append(f"| {label} | {_fmt(g(path + '.fve_nrm'))} | {ci_s} | {_fmt(g(path + '.fve_meannorm'))} | "
                         f"{_fmt(g(path + '.top1'))} | {_fmt(g(path + '.shuffled_gap'))} |")
        lines += ["", "### Baselines", "", "| predictor | fve_nrm |", "|---|---:|",
                  f"| mean direction (floor; fve_meannorm = 0) | {_fmt(g('baselines.mean_direction.fve_nrm'))} |",
                  f"| shuffled activations | {_fmt(g('baselines.shuffled_activations.fve_nrm'))} |",
                  f"| bag-of-words ridge on the AV's explanations | {_fmt(g('baselines.bow_ridge.on_av.fve_nrm'))} |",
                  f"| bag-of-words ridge on teacher labels | {_fmt(g('baselines.bow_ridge.on_teacher.fve_nrm'))} |", "",
                  "### Faithfulness probes", "",
                  "| probe | Δ fve_nrm |", "|---|---:|",
                  f"| paraphrase (rules) | {_fmt(g('probes.paraphrase.delta_fve_nrm'), True)} |",
                  f"| drop one claim | {_fmt(g('probes.claim_ablation.delta_fve_nrm'), True)} |",
                  f"| word shuffle | {_fmt(g('probes.word_shuffle.delta_fve_nrm'), True)} |", ""]
        if g("causal.enabled"):
            lines += ["### Causal faithfulness", "",
                      f"Reconstructions patched back into the base model at layer {k}: "
                      f"KL(clean ‖ patched) of the next-token distribution {_fmt(g('causal.kl.reconstruction'))} nats, "
                      f"against {_fmt(g('causal.kl.mean_ablation'))} for the mean μ: "
                      f"**{_fmt(g('causal.fraction_recovered'))}** of the KL recovered "
                      f"(drop one claim: ΔKL {_fmt(g('causal.claim_ablation.delta_kl'), True)}).", ""]
        lines += [f"Explanations: {_fmt(g('quality.av.length_words.mean'))} words on average, distinct rate "
                  f"{_fmt(g('quality.av.distinct_rate'))}, unparseable rate {_fmt(g('quality.av.unparseable_rate'))}. "
                  "The full report is `eval/metrics.json`.", ""]

    lines += ["## Training", ""]
    dstats = meta.get("dataset") or {}
    lines.append(f"* Activation dataset: {dstats.get('rows', '—')} positions" + (f" from the corpus `{corpus}`" if corpus else "")
                 + f"; baseline variance B = {_fmt(dstats.get('baseline_b'))}, mean norm {_fmt(dstats.get('norm_mean'))}.")
    for phase, info in (meta.get("training") or {}).items():
        if isinstance(info, dict):
            lines.append(f"* `{phase}`: " + ", ".join(f"{a} = {json.dumps(b)}" for a, b in info.items()))
    if not meta.get("training"):
        lines.append("* The sidecar records no training provenance (an imported or untrained bundle).")
    lines.append("")

    lines += ["## Known limits", "",
              f"* Reads only layer {k} of `{meta['base_model']}`; vectors from another layer or model are out of distribution.",
              "* Explanations are trained to reconstruct the vector, not to be true: a fluent explanation can still miss what "
              "the model uses (see the causal numbers) or encode the vector in word choice (see the word-shuffle probe).",
              "* Trained on one corpus" + (f" (`{corpus}`)" if corpus else "") + "; text far from it will be explained less well."]
    if metrics:
        rt, ridge = g("round_trip.fve_nrm"), g("baselines.bow_ridge.on_av.fve_nrm")
        if isinstance(rt, float) and isinstance(ridge, float) and ridge >= rt:
            lines.append(f"* The bag-of-words ridge on the same explanations scores {ridge:.3f} ≥ the AR's {rt:.3f}: the AR "
                         "adds little beyond word identity.")
        if isinstance(rt, float) and rt <= 0:
            lines.append(f"* Round-trip fve_nrm is {rt:.3f} ≤ 0: on held-out vectors the explanations do not beat the mean.")
        ws = g("probes.word_shuffle.delta_fve_nrm")
        if isinstance(ws, float) and abs(ws) < 0.02:
            lines.append(f"* Shuffling the words costs only {ws:+.3f} fve_nrm: word identity, not statements, carries the vector.")
    if kind == "LoRA":
        lines.append(f"* The adapters need the exact base weights of `{meta['base_model']}`.")
    lines.append("")

    where = repo or "THIS_FOLDER"
    universal = kind == "universal"
    lines += ["## How to load", "", "With `nla` (`pip install nla`):", "", "```python",
              *(["from huggingface_hub import snapshot_download"] if repo else []),
              "from nla.universal.bundle import UniversalNLA" if universal else "from nla import NLA", "",
              f"path = snapshot_download({json.dumps(repo)})" if repo else f"path = {json.dumps(where)}",
              "nla = UniversalNLA.from_pretrained(path)" if universal else "nla = NLA.from_pretrained(path)",
              "print(nla.round_trip(nla.tags[0], vectors))  # vectors: [n, d] of that model" if universal
              else "print(nla.explain(\"The cat sat on the mat.\", positions=[-1]))",
              "```", "", f"or `nla import {where} --out RUN` for a local bundle, `nla serve --nla RUN` for the web explorer.", ""]
    if universal:
        lines += ["Without `nla`: map a model's vector with its `adapters/<tag>/enc.safetensors` into the shared width, "
                  "then use the AV/AR as for a plain bundle (below) with the tag in the AV prompt, and map the AR's "
                  "output back with `dec.safetensors`.", ""]
    base_id = json.dumps(hub_base_model(meta["base_model"]) or meta["base_model"])
    lines += ["Without `nla` (transformers" + (" + peft" if kind == "LoRA" else "") + "). The AV's user message, "
              f"rendered with the chat template, with `{{marker}}` = {json.dumps(tokens['marker'])} (one token, id "
              f"{tokens['marker_id']}, between ids {tokens['left_id']} and {tokens['right_id']}):", "", "```text",
              meta["prompt_templates"]["av"], "```", "",
              ("The vector `v` replaces the marker's input embedding as `v * s / ||v||`, "
               f"s = {inj['scale']:g}." if inj["mode"] == "replace" else
               f"The vector `v` is added at the marker position of block {inj.get('layer')}'s output as "
               f"`h + coef * ||h|| * v / ||v||`, coef = {inj.get('coef')}.") + " The AV generates greedily; the "
              "explanation is the answer's text. The AR reads this template filled with an explanation, runs "
              f"blocks 0..{k} (no final norm) and applies the value head to the last token's state:", "", "```text",
              meta["prompt_templates"]["ar"], "```", "", "```python", "import torch",
              "from safetensors.torch import load_file",
              "from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer", ""]
    if kind == "LoRA":
        lines += ["from peft import PeftModel", "", f"tok = AutoTokenizer.from_pretrained({base_id})",
                  f"av = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_id}), path + \"/av\")",
                  f"ar = PeftModel.from_pretrained(AutoModel.from_pretrained({base_id}, num_hidden_layers={k + 1}), "
                  "path + \"/ar\")"]
    else:
        lines += ["tok = AutoTokenizer.from_pretrained(path + \"/av\")",
                  "av = AutoModelForCausalLM.from_pretrained(path + \"/av\")",
                  f"ar = AutoModel.from_pretrained(path + \"/ar\")  # blocks 0..{k}: its config says {k + 1} layers"]
    lines += ["head = load_file(path + \"/ar/value_head.safetensors\")[\"weight\"]",
              f"AV_PROMPT = {json.dumps(meta['prompt_templates']['av'])}",
              f"AR_TEMPLATE = {json.dumps(meta['prompt_templates']['ar'])}", ""]
    if inj["mode"] == "replace":
        lines += ["def verbalize(v):  # v: one activation vector, shape [d]",
                  f"    msg = [{{\"role\": \"user\", \"content\": AV_PROMPT.replace(\"{{marker}}\", {json.dumps(tokens['marker'])})}}]",
                  "    ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_dict=True, return_tensors=\"pt\")[\"input_ids\"]",
                  "    embeds = av.get_input_embeddings()(ids)",
                  f"    pos = (ids[0] == {tokens['marker_id']}).nonzero()[0, 0]",
                  f"    embeds[0, pos] = v / v.norm() * {inj['scale']:g}",
                  "    out = av.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=96, do_sample=False)",
                  "    return tok.decode(out[0], skip_special_tokens=True)", ""]
    lines += ["def reconstruct(explanation):",
              "    enc = tok(AR_TEMPLATE.replace(\"{explanation}\", explanation), return_tensors=\"pt\")",
              "    model = ar.get_base_model() if hasattr(ar, \"get_base_model\") else ar  # under a PEFT wrapper",
              "    for name in (\"norm\", \"ln_f\", \"final_layernorm\"):  # the AR reads the raw block output",
              "        if hasattr(model, name):",
              "            setattr(model, name, torch.nn.Identity())",
              "    return ar(**enc).last_hidden_state[0, -1] @ head.T",
              "```", ""]
    return "\n".join(line for line in lines if line is not None) + "\n"


def render_card(meta: dict[str, Any], metrics: dict[str, Any] | None, name: str, *, license: str | None = None,
                dataset: str | None = None, corpus: str | None = None, repo: str | None = None) -> str:
    """README.md text; parsed back by huggingface_hub's ModelCard before it is returned."""
    import yaml
    from huggingface_hub import ModelCard

    data = card_metadata(meta, metrics, name, license=license, dataset=dataset)
    text = "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n\n" + card_body(meta, metrics, name, corpus, repo)
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:
        raise NLAError(f"the model card does not parse with huggingface_hub ({str(exc).splitlines()[0]})") from None
    if metrics is not None and not getattr(card.data, "eval_results", None):
        raise NLAError("the model card's model-index did not parse into eval results")
    return text


# --------------------------------------------------------------------------- publish
def publish(run: str | Path, out: str | Path, *, report: str | Path | None = None, name: str | None = None,
            license: str | None = None, dataset: str | None = None, repo: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Write the publishable folder atomically (``OUT.tmp`` then swapped in)."""
    from nla.names import BUNDLE_KIND

    run = Path(run)
    out = Path(out)
    meta_path = run / META_NAME
    meta = read_sidecar(meta_path, BUNDLE_KIND, f"{run}: not a bundle (no {META_NAME}); `nla import` other layouts first")
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise NLAError(f"--out {out} is inside the bundle {run}; choose a folder elsewhere")
    if out.exists() and any(out.iterdir()) and not ((out / "README.md").exists() and (out / META_NAME).exists()):
        raise NLAError(f"--out {out} exists and is not a published folder; choose another")
    if out.exists() and any(out.iterdir()) and not force:
        raise NLAError(f"--out {out} already holds a published folder; pass --force to replace it")
    report_dir = Path(report) if report else find_report(run)
    metrics = None
    if report_dir is not None:
        from nla.eval.report import load_metrics

        metrics = load_metrics(report_dir)
    name = name or (repo.split("/")[-1] if repo else run.resolve().name)
    corpus = _corpus(meta)
    card = render_card(meta, metrics, name, license=license, dataset=dataset or hub_dataset(corpus), corpus=corpus, repo=repo)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for member in BUNDLE_MEMBERS:
        src = run / member
        if src.is_dir():
            shutil.copytree(src, tmp / member)
        elif src.exists():
            shutil.copy2(src, tmp / member)
    if metrics is not None:
        (tmp / "eval").mkdir()
        (tmp / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"out": str(out), "report": str(report_dir) if report_dir else None, "name": name}


def push(folder: str | Path, repo: str, *, token_env: str = "HF_TOKEN", private: bool = False,
         endpoint: str | None = None) -> str:
    """Upload ``folder`` to the hub repo ``repo`` with huggingface_hub's API; returns the commit URL."""
    from huggingface_hub import HfApi

    token = os.environ.get(token_env)
    if not token:
        raise NLAError(f"--push needs a hub token in the environment variable {token_env} (it is never written anywhere)")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise NLAError(f"--push {repo!r}: expected a repo id OWNER/NAME")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="Upload NLA bundle with `nla publish`")
    except Exception as exc:
        # The message may quote the request; strip anything that looks like the token.
        msg = " ".join(str(exc).split()).replace(token, "***")
        raise NLAError(f"upload to {repo} failed: {msg[:300]}") from None
    return str(getattr(info, "commit_url", info))


def cmd_publish(args: argparse.Namespace) -> int:
    result = publish(args.run, args.out, report=args.eval, name=args.name, license=args.license,
                     dataset=args.dataset, repo=args.push, force=args.force)
    note = f"model-index from {result['report']}" if result["report"] else "no eval report found (card without results)"
    print(f"{args.out}: published folder for {result['name']} ({note})")
    if args.push:
        url = push(args.out, args.push, token_env=args.token_env, private=args.private, endpoint=args.endpoint)
        print(f"pushed to {args.push}: {url}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "publish", help="a folder ready for the Hugging Face hub: bundle + model card (+ upload with --push)",
        description="Copies the bundle RUN to OUT with a README.md model card (YAML front matter: base_model, "
        "library_name, tags, license, datasets, model-index from the latest `nla eval` report of RUN) and the "
        "report's metrics.json. --push REPO uploads it with huggingface_hub (token from --token-env, never written). "
        "Layer K in the card = output of decoder block K (hidden_states[K+1]).")
    p.add_argument("run", help="bundle folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--eval", default=None, help="eval report to take the model-index from (default: the newest "
                   "report of RUN found in or next to it)")
    p.add_argument("--name", default=None, help="model name in the card (default: the repo name or RUN's folder name)")
    p.add_argument("--license", default=None, help="licence id (default: the base model's; 'other' when unknown)")
    p.add_argument("--dataset", default=None, help="hub dataset id for `datasets:` (default: the corpus when it is hf:NAME)")
    p.add_argument("--push", default=None, metavar="REPO", help="upload to this hub repo (OWNER/NAME)")
    p.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the hub token")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--endpoint", default=None, help="hub endpoint (default: huggingface_hub's, HF_ENDPOINT)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already holds a published folder")
    p.set_defaults(func=cmd_publish)
