"""`nla universal extract|fit-enc|train|fit-dec|add-model|eval` (docs/design.md §9).

The recipe (``configs/universal.yaml`` holds one section per subcommand; ``--config`` reads the
section named after the command, flags override it)::

    nla universal extract  --out U --models anchor=default other=tiny:gpt2     # same passages, each at its layer
    nla label --data U/anchor                                                  # teacher labels (any model's folder)
    nla universal fit-enc  --data U --model other                              # enc: other → anchor, held-out FVE
    nla universal train    --data U --out RUN                                  # SFT on enc-mapped tagged rows, then fit-dec
    nla universal add-model gemma3-270m --data U --nla RUN/bundle              # extract → fit-enc → fit-dec → eval
    nla universal eval     --data U --nla RUN/bundle                           # per-model FVE in each native space

Training reuses :func:`nla.train.sft.train_sft` unchanged in kind: the rows it reads are written
in the anchor's width (``enc_M(h_M)``) with a ``tag`` column the AV prompt shows as text.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from nla.config import opt, save_config, validate
from nla.config_fields import AnswerFields, DeviceFields, RuntimeFields, SeedFields
from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, write_yaml
from nla.models.reconstructor import identity_head
from nla.universal.bundle import ADAPTERS, UniversalNLA, read_map, save_map
from nla.universal.extract import (
    DATA_META,
    UniversalData,
    UniversalExtractConfig,
    default_tag,
    extract_model,
    universal_extract,
)
from nla.universal.fit import FitResult, fit_linear, identity_fit

SOURCES = ("positions", "pooled")
FIT_ENC_REPORT = "fit_enc.yaml"


@dataclass
class LstsqFields:
    """least squares"""

    driver: str = opt("gelsy", help="LAPACK driver: gelsy (rank-revealing QR), gelss (SVD) or gels (full rank only)")


# ---------------------------------------------------------------- fit-enc
@dataclass
class FitEncConfig(LstsqFields):
    data: str = opt("", help="universal extraction folder (`nla universal extract`)", required=True)
    model: str = opt("", help="tag of the model to map (its activations → the anchor's)", required=True)
    anchor: str | None = opt(None, help="target tag (default: the extraction's anchor)")
    source: str = opt("positions", help="paired rows: 'positions' (same text prefix) or 'pooled' (per-passage means)")
    ridge: float = opt(0.0, help="relative ridge λ (× mean per-dimension energy of the inputs); 0: plain least squares")
    out: str | None = opt(None, help="maps folder (default: DATA/adapters); writes <tag>/enc.safetensors + fit_enc.yaml")


def paired(data: UniversalData, tag: str, target: str, source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x from tag, y from target, held-out mask)``: rows of the same text, held out = `eval` passages."""
    if source not in SOURCES:
        raise NLAError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "pooled":
        ids_x, splits, x = data.pooled(tag)
        ids_y, _, y = data.pooled(target)
        where = {d: i for i, d in enumerate(ids_y)}
        keep = [i for i, d in enumerate(ids_x) if d in where]
        return x[keep], y[[where[ids_x[i]] for i in keep]], torch.tensor([splits[i] == "eval" for i in keep])
    keys_x, keys_y = data.pairs(tag), data.pairs(target)
    where_y = {k: i for i, k in enumerate(keys_y)}
    keep = [i for i, k in enumerate(keys_x) if k in where_y]
    ds_x, ds_y = data.dataset(tag), data.dataset(target)
    splits_x = ds_x.table(["split"]).column("split").to_pylist()
    x, y = ds_x.vectors(), ds_y.vectors()
    return x[keep], y[[where_y[keys_x[i]] for i in keep]], torch.tensor([splits_x[i] == "eval" for i in keep],
                                                                         dtype=torch.bool)


def fit_enc(data: UniversalData, tag: str, anchor: str | None = None, *, source: str = "positions",
            ridge: float = 0.0, driver: str = "gelsy") -> FitResult:
    """``enc_tag``: tag's activations → the anchor's, scored on held-out (`eval`) passages."""
    anchor = anchor or data.anchor
    if tag == anchor:
        return identity_fit(data.dataset(anchor).d_model)
    x, y, held = paired(data, tag, anchor, source)
    if int((~held).sum()) < 2:
        raise NLAError(f"{data.root}: only {int((~held).sum())} paired training rows between {tag!r} and {anchor!r}")
    return fit_linear(x[~held], y[~held], x[held], y[held], ridge=ridge, driver=driver)


def save_enc(maps: Path, tag: str, result: FitResult, settings: dict[str, Any]) -> None:
    save_map(result.layer, maps / tag / "enc.safetensors")
    write_yaml(maps / tag / FIT_ENC_REPORT, {**result.report(), **settings})


def load_enc(maps: Path, tag: str) -> nn.Linear:
    path = maps / tag / "enc.safetensors"
    if not path.exists():
        raise NLAError(f"{path}: no enc map for {tag!r}; run `nla universal fit-enc --model {tag}` first")
    return read_map(path)


def _print_fit(kind: str, tag: str, result: FitResult) -> None:
    held = result.heldout.get("fve_nrm")
    print(f"{kind} {tag}: {result.layer.in_features}→{result.layer.out_features}, rank {result.rank}, "
          f"train fve_nrm {result.train.get('fve_nrm', float('nan')):.4f}"
          + (f", held-out fve_nrm {held:.4f} ({int(result.heldout['n'])} rows)" if held is not None else "")
          + f", {result.seconds:.3f}s")


def cmd_fit_enc(cfg: FitEncConfig) -> FitResult:
    validate(cfg, "fit-enc")  # required --data and --model, as from flags and YAML
    data = UniversalData(cfg.data)
    result = fit_enc(data, cfg.model, cfg.anchor, source=cfg.source, ridge=cfg.ridge, driver=cfg.driver)
    maps = Path(cfg.out) if cfg.out else data.root / ADAPTERS
    save_enc(maps, cfg.model, result, {"anchor": cfg.anchor or data.anchor, "source": cfg.source,
                                       "ridge": cfg.ridge, "driver": cfg.driver})
    _print_fit("fit-enc", cfg.model, result)
    return result


# ---------------------------------------------------------------- round trips and fit-dec
@torch.no_grad()
def shared_predictions(nla: Any, tag: str, shared: torch.Tensor, *, max_new_tokens: int = 64,
                       batch_size: int = 32) -> torch.Tensor:
    """``AR(AV(z))`` in the shared space, the AV told the model's tag: what ``dec_M`` must map."""
    answers = [outs[0] for outs in nla.verbalizer.generate(shared, n=1, tags=[tag] * len(shared),
                                                           max_new_tokens=max_new_tokens, batch_size=batch_size)]
    texts = [a.explanation if a.explanation is not None else a.raw for a in answers]
    return nla.reconstruct(texts, batch_size=batch_size).float().cpu()


def fit_rows(vectors: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded subset of at most n rows (generation is the cost; the fit needs a few × d rows)."""
    if len(vectors) <= n:
        return vectors
    return vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:n]]


def fit_dec(nla: Any, tag: str, enc: nn.Linear, native: torch.Tensor, *, ridge: float = 0.0,
            driver: str = "gelsy", max_new_tokens: int = 64, batch_size: int = 32) -> FitResult:
    """``dec_tag``: least squares from the AR's actual round-trip predictions to the native vectors.

    Not ``pinv(enc)``: the AR never returns exactly ``enc(h)``, and the inverse of enc would
    map its real outputs (biased toward what words can carry) to the wrong place.
    """
    with torch.no_grad():
        shared = enc.to(native.device)(native.float())
    pred = shared_predictions(nla, tag, shared.to(nla.device), max_new_tokens=max_new_tokens, batch_size=batch_size)
    return fit_linear(pred, native.float().cpu(), ridge=ridge, driver=driver)


@dataclass
class FitDecConfig(LstsqFields, AnswerFields, DeviceFields, SeedFields):
    nla: str = opt("", help="universal bundle (from `nla universal train`); the map is written into it", required=True)
    data: str = opt("", help="universal extraction folder with the model's activations", required=True)
    model: str = opt("", help="tag of the model", required=True)
    rows: int = opt(256, help="training-split rows round-tripped through AV and AR to fit on")
    ridge: float = opt(1e-3, help="relative ridge λ (the AR's predictions are low-rank: a little ridge keeps dec sane)")
    batch_size: int = opt(32, help="sequences per generation / AR batch")


def register_maps(bundle: Path, tag: str, enc: nn.Linear, dec: nn.Linear, info: dict[str, Any]) -> None:
    """Write ``adapters/<tag>/{enc,dec}`` and list the tag in ``extra.universal`` (only these change)."""
    meta_path = bundle / META_NAME
    data = read_yaml(meta_path)
    uni = (data.get("extra") or {}).get("universal")
    if not isinstance(uni, dict):
        raise NLAError(f"{meta_path}: not a universal bundle (no extra.universal); train one with `nla universal train`")
    d_shared = int(uni["d_shared"])
    if enc.out_features != d_shared or dec.in_features != d_shared or enc.in_features != dec.out_features:
        raise NLAError(f"model {tag!r}: enc {enc.in_features}→{enc.out_features}, dec {dec.in_features}→"
                       f"{dec.out_features} do not fit the bundle's d_shared={d_shared}")
    save_map(enc, bundle / ADAPTERS / tag / "enc.safetensors")
    save_map(dec, bundle / ADAPTERS / tag / "dec.safetensors")
    if tag not in uni["tags"]:
        uni["tags"] = [*uni["tags"], tag]
    models = dict(uni.get("models") or {})
    models[tag] = {**dict(models.get(tag) or {}), **info}
    uni["models"] = models
    write_yaml(meta_path, data)  # last: a kill before it leaves the tag unlisted, not half-listed


def _split_vectors(data: UniversalData, tag: str, train: bool) -> torch.Tensor:
    from nla.data.store import TRAINING_SPLITS

    ds = data.dataset(tag)
    return ds.vectors(TRAINING_SPLITS if train else "eval")


def cmd_fit_dec(cfg: FitDecConfig) -> FitResult:
    validate(cfg, "fit-dec")  # required --nla, --data and --model, as from flags and YAML
    u = UniversalNLA.from_pretrained(cfg.nla, device=cfg.device)
    data = UniversalData(cfg.data)
    enc = u.maps[cfg.model][0] if cfg.model in u.maps else load_enc(data.root / ADAPTERS, cfg.model)
    native = fit_rows(_split_vectors(data, cfg.model, train=True), cfg.rows, cfg.seed)
    result = fit_dec(u.nla, cfg.model, enc, native, ridge=cfg.ridge, driver=cfg.driver,
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    register_maps(Path(cfg.nla), cfg.model, enc, result.layer, _model_info(data, cfg.model) | {"fit_dec": result.report()})
    _print_fit("fit-dec", cfg.model, result)
    return result


def _model_info(data: UniversalData, tag: str) -> dict[str, Any]:
    info = data.models.get(tag) or {}
    return {"model": info.get("model"), "layer": info.get("layer"), "d_model": info.get("d_model")}


# ---------------------------------------------------------------- eval
@dataclass
class UniversalEvalConfig(AnswerFields, DeviceFields):
    nla: str = opt("", help="universal bundle", required=True)
    data: str = opt("", help="universal extraction folder (each model's `eval` split is used)", required=True)
    models: list[str] = opt([], help="tags to evaluate (default: every bundle tag extracted in --data)")
    rows: int = opt(64, help="eval rows per model")
    batch_size: int = opt(32, help="sequences per generation / AR batch")
    out: str | None = opt(None, help="also write the table as JSON here")


def evaluate_model(u: UniversalNLA, data: UniversalData, tag: str, *, rows: int = 64, max_new_tokens: int = 64,
                   batch_size: int = 32) -> dict[str, Any]:
    """One row: FVE of ``dec(AR(AV(enc(h))))`` vs ``h`` in the model's own space, with baselines."""
    from nla import metrics

    ds = data.dataset(tag)
    h = _split_vectors(data, tag, train=False)[:rows]
    if len(h) < 2:
        raise NLAError(f"{data.root / tag}: {len(h)} eval rows; extract more documents or raise the eval split")
    mean = ds.mean_vector()
    started = time.perf_counter()
    dec = u.maps[tag][1]
    shared = u.encode(tag, h)
    recon = dec(shared_predictions(u.nla, tag, shared.to(u.nla.device), max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)).detach()
    summary = metrics.summarize(recon, h, mean)
    info = u.models.get(tag) or {}
    with torch.no_grad():
        linear = dec(shared)  # the two maps alone, no words in between: the ceiling the maps allow
    return {
        "tag": tag, "model": info.get("model") or data.models.get(tag, {}).get("model"), "d_model": h.shape[1],
        "held_out": not info.get("trained", False), "rows": len(h),
        "fve_nrm": summary["fve_nrm"], "fve_meannorm": summary["fve_meannorm"], "cosine": summary["cosine"],
        "baseline_fve_nrm": metrics.fve_nrm(mean.unsqueeze(0).expand(len(h), -1), h, mean),
        "maps_only_fve_nrm": metrics.fve_nrm(linear, h, mean),
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'tag':<18} {'d':>5} {'held-out':>8} {'rows':>5} {'fve_nrm':>8} {'mean-dir':>9} {'maps-only':>9} {'cosine':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['tag']:<18} {r['d_model']:>5} {'yes' if r['held_out'] else 'no':>8} {r['rows']:>5} "
                     f"{r['fve_nrm']:>8.4f} {r['baseline_fve_nrm']:>9.4f} {r['maps_only_fve_nrm']:>9.4f} {r['cosine']:>7.4f}")
    return "\n".join(lines)


def cmd_eval(cfg: UniversalEvalConfig) -> list[dict[str, Any]]:
    validate(cfg, "universal eval")  # required --nla and --data, as from flags and YAML
    u = UniversalNLA.from_pretrained(cfg.nla, device=cfg.device)
    data = UniversalData(cfg.data)
    tags = list(cfg.models) or [t for t in u.tags if data.models.get(t, {}).get("complete")]
    for t in tags:
        if t not in u.maps:
            raise NLAError(f"{cfg.nla}: no maps for {t!r} (bundle tags: {', '.join(u.tags)}); run add-model")
    rows = [evaluate_model(u, data, t, rows=cfg.rows, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
            for t in tags]
    print(format_table(rows))
    print("fve_nrm: dec(AR(AV(enc(h)))) vs h in the model's own space; mean-dir: the best constant; "
          "maps-only: dec(enc(h)), no words in between")
    if cfg.out:
        import json

        Path(cfg.out).write_text(json.dumps(rows, indent=2))
    return rows


# ---------------------------------------------------------------- train
@dataclass
class UniversalTrainConfig(LstsqFields, AnswerFields, DeviceFields, SeedFields):
    data: str = opt("", help="universal extraction folder; at least one model's dataset labelled (`nla label`)", required=True)
    out: str = opt("", help="run folder: shared/ (the tagged dataset), sft/ (the SFT run), bundle/ (the result)", required=True)
    models: list[str] = opt([], help="tags to train on (default: the anchor and every tag with an enc map)")
    maps: str | None = opt(None, help="folder of enc maps from fit-enc (default: DATA/adapters)")
    sft: dict[str, Any] = opt({}, help="settings for the SFT trainer (any `nla train sft` field; YAML only)")
    max_steps: int | None = opt(None, help="SFT optimizer steps per model (overrides sft.max_steps)")
    lr: float | None = opt(None, help="SFT learning rate (overrides sft.lr)")
    batch_size: int | None = opt(None, help="SFT micro-batch (overrides sft.batch_size)")
    dec_rows: int = opt(256, help="training rows per model round-tripped to fit dec")
    dec_ridge: float = opt(1e-3, help="relative ridge for dec (its --driver and --max-new-tokens fit dec too)")


def _explanations(data: UniversalData) -> dict[tuple[str, int], str]:
    """Teacher labels by (doc_id, char_end): the same text prefix gets the same label in every model."""
    found: dict[tuple[str, int], str] = {}
    for tag in data.models:
        if not data.models[tag].get("complete"):
            continue
        expl = data.dataset(tag).table(["explanation"]).column("explanation").to_pylist()
        for key, e in zip(data.pairs(tag), expl, strict=True):
            if e and key not in found:
                found[key] = e
    return found


def build_shared_dataset(data: UniversalData, maps: dict[str, nn.Linear], out: Path) -> Any:
    """Every training model's rows as ``enc_M(h_M)`` in the anchor's width, tagged, labelled."""
    from nla.data.store import ActivationDataset, make_table, shard_name, write_table
    from nla.meta import DatasetMeta

    if (out / META_NAME).exists():
        ds = ActivationDataset.open(out)
        if ds.meta.complete and ds.meta.extra.get("tags") == sorted(maps):
            return ds
        raise NLAError(f"{out}: a shared dataset for other models is there; use another --out")
    labels = _explanations(data)
    if not labels:
        raise NLAError(f"{data.root}: no model's dataset is labelled; run `nla label --data {data.root / data.anchor}`")
    anchor_ds = data.dataset(data.anchor)
    d_shared = anchor_ds.d_model
    out.mkdir(parents=True, exist_ok=True)
    for i, tag in enumerate(sorted(maps)):
        ds = data.dataset(tag)
        rows = ds.rows()
        keys = data.pairs(tag)
        with torch.no_grad():
            shared = maps[tag](ds.vectors().float())
        cols: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in ("doc_id", "position", "context", "split")}
        cols["explanation"] = [r["explanation"] or labels.get(k) for r, k in zip(rows, keys, strict=True)]
        table = make_table(cols, shared, d_shared).append_column("tag", pa.array([tag] * len(rows), pa.string()))
        write_table(out / shard_name(i), table)
    meta = DatasetMeta(base_model=anchor_ds.meta.base_model, layer_index=anchor_ds.meta.layer_index, d_model=d_shared,
                       n_layers=anchor_ds.meta.n_layers, corpus=anchor_ds.meta.corpus,
                       sampling={"tags": sorted(maps)},
                       split_fractions=anchor_ds.meta.split_fractions, extra={"tags": sorted(maps)})
    write_yaml(out / META_NAME, meta.to_dict())
    ds = ActivationDataset.open(out)
    ds.finalize_stats()
    return ds


def train_universal(cfg: UniversalTrainConfig) -> Path:
    """Shared dataset → SFT (the ordinary trainer) → dec per model → a universal bundle in OUT/bundle."""
    from nla.train.sft import SFTConfig, train_sft

    validate(cfg, "universal train")  # required --data and --out, as from flags and YAML
    data = UniversalData(cfg.data)
    maps_dir = Path(cfg.maps) if cfg.maps else data.root / ADAPTERS
    tags = list(cfg.models) or [data.anchor, *sorted(t for t in data.models if t != data.anchor
                                                      and (maps_dir / t / "enc.safetensors").exists())]
    d_shared = data.dataset(data.anchor).d_model
    maps = {t: identity_head(d_shared) if t == data.anchor else load_enc(maps_dir, t) for t in tags}
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "universal_train_config.yaml")
    shared = build_shared_dataset(data, maps, run / "shared")
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(cfg.sft) - fields)
    if unknown:
        raise NLAError(f"universal train: unknown SFT setting {unknown[0]!r} under 'sft'")
    sft_values: dict[str, Any] = {"seed": cfg.seed, "device": cfg.device, **cfg.sft}
    for key in ("max_steps", "lr", "batch_size"):
        if getattr(cfg, key) is not None:
            sft_values[key] = getattr(cfg, key)
    sft_dir = run / "sft"
    sft_values.update(data=str(shared.path), out=str(sft_dir), resume=(sft_dir / "train_config.yaml").exists())
    nla = train_sft(SFTConfig(**sft_values))
    nla.av_model.eval()
    nla.ar.eval()
    decs: dict[str, tuple[nn.Linear, nn.Linear]] = {}
    models: dict[str, dict[str, Any]] = {}
    enc_reports = {t: read_yaml(maps_dir / t / FIT_ENC_REPORT) for t in tags
                   if (maps_dir / t / FIT_ENC_REPORT).exists()}
    for tag in tags:
        native = fit_rows(_split_vectors(data, tag, train=True), cfg.dec_rows, cfg.seed)
        result = fit_dec(nla, tag, maps[tag], native, ridge=cfg.dec_ridge, driver=cfg.driver,
                         max_new_tokens=cfg.max_new_tokens)
        _print_fit("fit-dec", tag, result)
        decs[tag] = (maps[tag], result.layer)
        models[tag] = {**_model_info(data, tag), "trained": True, "fit_dec": result.report(),
                       **({"fit_enc": enc_reports[tag]} if tag in enc_reports else {})}
    u = UniversalNLA(nla, data.anchor, decs, models)
    u.save_pretrained(run / "bundle")
    print(f"{run / 'bundle'}: universal bundle, trunk {nla.meta.base_model}, trained on {', '.join(tags)}")
    return run / "bundle"


# ---------------------------------------------------------------- add-model
@dataclass
class AddModelConfig(LstsqFields, AnswerFields, RuntimeFields):
    model: str = opt("", help="the new model: hub id, local path, 'gemma3-270m', 'tiny:<arch>', ...")
    tag: str | None = opt(None, help="its tag (default: derived from the spec, e.g. tiny:gpt2 → tiny-gpt2)")
    layer: int | None = opt(None, help="layer K = output of decoder block K (0-based) = hidden_states[K+1]; default (2*n_layers)//3")
    nla: str = opt("", help="universal bundle to add the model to (its trunk is not touched)")
    data: str = opt("", help="universal extraction folder (the new model is extracted on its passages)")
    source: str = opt("positions", help="enc pairs: 'positions' or 'pooled'")
    ridge: float = opt(0.0, help="relative ridge for enc")
    dec_ridge: float = opt(1e-3, help="relative ridge for dec")
    dec_rows: int = opt(256, help="training rows round-tripped to fit dec")
    eval_rows: int = opt(64, help="eval rows")
    batch_size: int = opt(8, help="documents per extraction forward pass")


def add_model(cfg: AddModelConfig) -> dict[str, Any]:
    """extract → fit-enc → fit-dec → eval for one new model; the trunk is never retrained."""
    if not (cfg.model and cfg.nla and cfg.data):
        raise NLAError("add-model: MODEL, --nla and --data are required")
    tag = cfg.tag or default_tag(cfg.model)
    data = UniversalData(cfg.data)
    bundle_meta = read_yaml(Path(cfg.nla) / META_NAME) if (Path(cfg.nla) / META_NAME).exists() else {}
    if tag in ((bundle_meta.get("extra") or {}).get("universal") or {}).get("models", {}) and \
            bundle_meta["extra"]["universal"]["models"][tag].get("trained"):
        raise NLAError(f"{cfg.nla}: {tag!r} is a training model of this bundle; add-model is for new models")
    extract_model(data, tag, cfg.model, cfg.layer, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
                  docs_per_shard=int((data.dataset(data.anchor).meta.sampling or {}).get("docs_per_shard", 256)))
    data = UniversalData(cfg.data)
    enc = fit_enc(data, tag, source=cfg.source, ridge=cfg.ridge, driver=cfg.driver)
    _print_fit("fit-enc", tag, enc)
    save_enc(data.root / ADAPTERS, tag, enc, {"anchor": data.anchor, "source": cfg.source, "ridge": cfg.ridge,
                                              "driver": cfg.driver})
    u = UniversalNLA.from_pretrained(cfg.nla, device=cfg.device)
    if enc.layer.out_features != u.d_shared:
        raise NLAError(f"{cfg.data}: the anchor has width {enc.layer.out_features}, the bundle's d_shared is {u.d_shared}")
    native = fit_rows(_split_vectors(data, tag, train=True), cfg.dec_rows, cfg.seed)
    dec = fit_dec(u.nla, tag, enc.layer, native, ridge=cfg.dec_ridge, driver=cfg.driver,
                  max_new_tokens=cfg.max_new_tokens)
    _print_fit("fit-dec", tag, dec)
    info = {**_model_info(data, tag), "trained": False, "fit_enc": enc.report(), "fit_dec": dec.report()}
    register_maps(Path(cfg.nla), tag, enc.layer, dec.layer, info)
    u.add_model(tag, enc.layer, dec.layer, info)
    row = evaluate_model(u, data, tag, rows=cfg.eval_rows, max_new_tokens=cfg.max_new_tokens)
    print(format_table([row]))
    return row


# ---------------------------------------------------------------- CLI
COMMANDS: dict[str, tuple[type, Any, str]] = {
    "extract": (UniversalExtractConfig, universal_extract,
                "activations of several models on the same passages (per position and per-passage means)"),
    "fit-enc": (FitEncConfig, cmd_fit_enc, "least-squares enc map: a model's activations → the anchor's"),
    "train": (UniversalTrainConfig, train_universal, "SFT of one AV/AR on enc-mapped, tagged rows; then dec maps"),
    "fit-dec": (FitDecConfig, cmd_fit_dec, "least-squares dec map: the AR's round-trip predictions → native vectors"),
    "add-model": (AddModelConfig, add_model, "extract → fit-enc → fit-dec → eval for a new model (trunk untouched)"),
    "eval": (UniversalEvalConfig, cmd_eval, "per-model FVE of dec(AR(AV(enc(h)))) vs h in each native space"),
}


def section(command: str) -> str:
    """The YAML section a command reads: ``fit-enc`` → ``fit_enc``."""
    return command.replace("-", "_")


def check_recipe(path: str | Path) -> dict[str, Any]:
    """Validate a recipe file: every section must be settings of its subcommand."""
    from nla.config import config_from_dict

    data = read_yaml(path)
    for key, value in data.items():
        names = {section(c): c for c in COMMANDS}
        if key not in names:
            raise NLAError(f"{path}: unknown section {key!r} (sections: {', '.join(names)})")
        if not isinstance(value, dict):
            raise NLAError(f"{path}: section {key!r} must be a mapping")
        cls = COMMANDS[names[key]][0]
        # A section holds shared settings; required ones (--model, ...) come with each command.
        config_from_dict(cls, {k: v for k, v in value.items()}, where=f"{path}: {key}", partial=True)
    return data


def register(sub: Any) -> None:
    from nla.config import add_config_args, resolve_config

    p = sub.add_parser("universal", help="universal adapters: one AV/AR for many models (enc/dec maps)",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    inner = p.add_subparsers(dest="universal_command", metavar="STEP")
    for name, (cls, fn, text) in COMMANDS.items():
        q = inner.add_parser(name, help=text, description=text + ". Settings: flags, or --config YAML "
                             f"(section '{section(name)}'); layer K = output of decoder block K (0-based).")
        if cls is AddModelConfig:
            q.add_argument("model", metavar="MODEL", help="the new model (hub id, path, 'gemma3-270m', 'tiny:<arch>')")
            add_config_args(q, cls, skip=("model",))
        else:
            add_config_args(q, cls)

        def run(args: Any, cls: type = cls, fn: Any = fn, name: str = name) -> int:
            cfg: Any = resolve_config(cls, args, section=section(name))
            if cls is AddModelConfig:
                cfg.model = args.model
            fn(cfg)
            return 0

        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


__all__ = ["DATA_META", "AddModelConfig", "FitDecConfig", "FitEncConfig", "UniversalEvalConfig",
           "UniversalTrainConfig", "add_model", "check_recipe", "cmd_eval", "cmd_fit_dec", "cmd_fit_enc",
           "evaluate_model", "fit_dec", "fit_enc", "train_universal"]
