"""The report folder: ``metrics.json``, ``samples.jsonl``, ``plots/*.png`` and ``index.html``.

``index.html`` is one self-contained file: styles, the few lines of script for the samples
filter, and the plots (as ``data:`` URIs) are all inline, so it opens offline, from an e-mail
attachment or a CI artifact, with no CDN. The PNGs are also written under ``plots/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from nla.errors import NLAError
from nla.names import EVAL_KIND, EVAL_SCHEMA_VERSION, METRICS_FILE, SAMPLES_FILE, write_text_atomic

# (label, dotted path into metrics.json): the rows `nla eval compare` prints and the page leads with.
COMPARE_ROWS: list[tuple[str, str]] = [
    ("rows evaluated", "dataset.rows_evaluated"),
    ("AR alone fve_nrm", "ar_alone.fve_nrm"),
    ("AR alone fve_meannorm", "ar_alone.fve_meannorm"),
    ("AR alone top-1", "ar_alone.top1"),
    ("round trip fve_nrm", "round_trip.fve_nrm"),
    ("round trip fve_meannorm", "round_trip.fve_meannorm"),
    ("round trip mse_nrm", "round_trip.mse_nrm"),
    ("round trip cosine", "round_trip.cosine"),
    ("round trip top-1", "round_trip.top1"),
    ("round trip shuffled gap", "round_trip.shuffled_gap"),
    ("best-of-k fve_nrm", "round_trip.best_of_k.fve_nrm"),
    ("mean direction fve_nrm", "baselines.mean_direction.fve_nrm"),
    ("shuffled activations fve_nrm", "baselines.shuffled_activations.fve_nrm"),
    ("BoW ridge (AV text) fve_nrm", "baselines.bow_ridge.on_av.fve_nrm"),
    ("BoW ridge (teacher) fve_nrm", "baselines.bow_ridge.on_teacher.fve_nrm"),
    ("paraphrase Δfve_nrm", "probes.paraphrase.delta_fve_nrm"),
    ("teacher paraphrase Δfve_nrm", "probes.paraphrase_teacher.delta_fve_nrm"),
    ("claim ablation Δfve_nrm", "probes.claim_ablation.delta_fve_nrm"),
    ("word shuffle Δfve_nrm", "probes.word_shuffle.delta_fve_nrm"),
    ("causal KL, reconstruction", "causal.kl.reconstruction"),
    ("causal KL, mean ablation", "causal.kl.mean_ablation"),
    ("causal fraction of KL recovered", "causal.fraction_recovered"),
    ("causal drop-one-claim ΔKL", "causal.claim_ablation.delta_kl"),
    ("unparseable rate", "quality.av.unparseable_rate"),
    ("distinct rate", "quality.av.distinct_rate"),
    ("mean length (words)", "quality.av.length_words.mean"),
    ("judge mean score", "quality.av.judge.mean_score"),
    ("total seconds", "timing_s.total"),
]
BLOCK_COLUMNS = ["fve_nrm", "fve_meannorm", "mse_nrm", "cosine", "top1", "shuffled_gap", "n"]


def lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


# --------------------------------------------------------------------------- files
def write_report(result: Any, out: str | Path, html_samples: int = 500) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / METRICS_FILE, json.dumps(result.metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(out / SAMPLES_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples))
    plots = make_plots(result.metrics, result.plots)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    write_text_atomic(out / "index.html", render_html(result.metrics, result.samples, plots, html_samples))


def load_metrics(path: str | Path) -> dict[str, Any]:
    """``metrics.json`` of a report folder (or the file itself), schema-checked."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.exists():
        raise NLAError(f"{path}: no {METRICS_FILE} (not an `nla eval` report)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise NLAError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != EVAL_KIND:
        raise NLAError(f"{p}: field 'kind' is not {EVAL_KIND!r}")
    if data.get("schema_version") != EVAL_SCHEMA_VERSION:
        raise NLAError(f"{p}: schema_version {data.get('schema_version')!r}, this nla reads {EVAL_SCHEMA_VERSION}")
    return data


# --------------------------------------------------------------------------- plots
def make_plots(m: dict[str, Any], arrays: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per plot name (matplotlib, headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    out: dict[str, bytes] = {}
    rt = [x for x in arrays.get("rt_fve", []) if math.isfinite(x)]
    ar = [x for x in arrays.get("ar_fve", []) if math.isfinite(x)]
    floor = lookup(m, "baselines.mean_direction.fve_nrm")

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    lo = min([*rt, *ar, floor if floor is not None else 0.0, -0.1])
    bins = [lo + (1.0 - lo) * i / 40 for i in range(41)]
    ax.hist([max(x, lo) for x in rt], bins=bins, alpha=0.7, label="round trip (AV→AR)")
    if ar:
        ax.hist([max(x, lo) for x in ar], bins=bins, alpha=0.5, label="AR alone (teacher)")
    ax.axvline(0.0, color="black", lw=1)
    if floor is not None:
        ax.axvline(floor, color="red", ls="--", lw=1, label="mean direction")
    ax.set_xlabel("per-sample fve_nrm")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    out["fve_hist"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    buckets = lookup(m, "breakdowns.position_bucket") or []
    pos = arrays.get("positions", [])
    pts = [(p, f) for p, f in zip(pos, arrays.get("rt_fve", [])) if isinstance(p, int) and p >= 0 and math.isfinite(f)]
    if pts:
        ax.scatter([p for p, _ in pts], [f for _, f in pts], s=6, alpha=0.4, label="samples")
    centers = []
    for b in buckets:
        key = str(b["key"])
        if key == "unknown":
            continue
        lo_b = float(key.split("-")[0].rstrip("+"))
        hi_b = float(key.split("-")[1]) if "-" in key else lo_b * 2
        centers.append(((lo_b + hi_b) / 2, b["fve_nrm"]))
    if centers:
        ax.plot([c for c, _ in centers], [f for _, f in centers], "o-", color="C1", label="bucket mean")
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xlabel("token position")
    ax.set_ylabel("round-trip fve_nrm")
    ax.legend(fontsize=8)
    out["fve_by_position"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    av_len = arrays.get("av_lengths", [])
    t_len = arrays.get("teacher_lengths", [])
    top = max([*av_len, *t_len, 1])
    bins_l = list(range(0, top + 2, max(1, (top + 1) // 30)))
    ax.hist(av_len, bins=bins_l, alpha=0.7, label="AV explanations")
    if t_len:
        ax.hist(t_len, bins=bins_l, alpha=0.5, label="teacher labels")
    ax.set_xlabel("length (words)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    out["length_hist"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names, values = [], []
    for label, path in [("paraphrase (rules)", "probes.paraphrase.delta_fve_nrm"),
                        ("paraphrase (teacher)", "probes.paraphrase_teacher.delta_fve_nrm"),
                        ("word shuffle", "probes.word_shuffle.delta_fve_nrm"),
                        ("drop one claim (mean)", "probes.claim_ablation.delta_fve_nrm")]:
        v = lookup(m, path)
        if isinstance(v, (int, float)):
            names.append(label)
            values.append(float(v))
    for entry in lookup(m, "probes.claim_ablation.per_claim_index") or []:
        names.append(f"drop claim {entry['index'] + 1}")
        values.append(float(entry["delta_fve_nrm"]))
    if names:
        ax.barh(names, values, color=["C3" if v < 0 else "C2" for v in values])
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "probes not run", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(0.0, color="black", lw=1)
    ax.set_xlabel("Δ fve_nrm vs. the unedited explanation")
    out["probe_deltas"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    pairs = arrays.get("causal_kl") or []
    if pairs:
        recon, mean = [p[0] for p in pairs], [p[1] for p in pairs]
        ax.scatter(mean, recon, s=10, alpha=0.6, color="C0", label="one row")
        top = max(max(recon), max(mean)) or 1.0
        ax.plot([0, top], [0, top], color="C3", lw=1, label="no better than μ (0 % recovered)")
        ax.set_xlabel("KL(clean ‖ μ patched), nats")
        ax.set_ylabel("KL(clean ‖ reconstruction patched)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "causal block not run", ha="center", va="center", transform=ax.transAxes)
    frac = lookup(m, "causal.fraction_recovered")
    ax.set_title(f"causal faithfulness: {fmt(100 * frac, 1) if isinstance(frac, float) else '—'} % of KL recovered", fontsize=10)
    out["causal_kl"] = png(fig)
    return out


# --------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4;cursor:default}td.l,th.l{text-align:left}
#samples th{cursor:pointer}#samples td{max-width:420px;white-space:pre-wrap;word-break:break-word}
mark{background:#ffd54f;padding:0 1px}.ctx{color:#555}.neg{color:#b00020}.pos{color:#1b5e20}
.notes li{color:#8a4b00}.plots{display:flex;flex-wrap:wrap}.plots img{max-width:640px;width:48%;margin:4px;border:1px solid #eee}
.muted{color:#888}small{color:#666}
"""

JS = """
function filterSamples(){const q=document.getElementById('filter').value.toLowerCase();
for(const tr of document.querySelectorAll('#samples tbody tr')){tr.style.display=tr.textContent.toLowerCase().includes(q)?'':'none';}}
function sortSamples(col){const tb=document.querySelector('#samples tbody');const rows=[...tb.rows];
const dir=tb.dataset.col==String(col)&&tb.dataset.dir=='asc'?'desc':'asc';tb.dataset.col=col;tb.dataset.dir=dir;
rows.sort((a,b)=>{const x=a.cells[col].dataset.v??a.cells[col].textContent,y=b.cells[col].dataset.v??b.cells[col].textContent;
const nx=parseFloat(x),ny=parseFloat(y);const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));return dir=='asc'?c:-c;});
for(const r of rows)tb.appendChild(r);}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num_cell(value: Any, signed: bool = False) -> str:
    cls = ""
    if signed and isinstance(value, (int, float)) and math.isfinite(float(value)):
        cls = ' class="neg"' if value < 0 else ' class="pos"'
    return f"<td{cls}>{_e(fmt(value))}</td>"


def _block_row(label: str, block: Any, note: str = "") -> str:
    if not isinstance(block, dict) or not block.get("n"):
        why = (block or {}).get("note") if isinstance(block, dict) else None
        return f'<tr><td class="l">{_e(label)}</td><td class="l muted" colspan="{len(BLOCK_COLUMNS)}">{_e(why or "not measured")}</td></tr>'
    ci = block.get("ci95") or {}
    cells = []
    for col in BLOCK_COLUMNS:
        v = block.get(col)
        text = fmt(v)
        if ci.get(col):
            text += f" <small>[{fmt(ci[col][0])}, {fmt(ci[col][1])}]</small>"
        cells.append(f'<td data-metric="{col}">{text if ci.get(col) else _e(text)}</td>')
    extra = f" <small>{_e(note)}</small>" if note else ""
    return f'<tr><td class="l">{_e(label)}{extra}</td>{"".join(cells)}</tr>'


def _block_header(first: str) -> str:
    heads = {"fve_nrm": "fve_nrm [95% CI]", "fve_meannorm": "fve_meannorm", "mse_nrm": "mse_nrm",
             "cosine": "cosine", "top1": "top-1", "shuffled_gap": "shuffled gap", "n": "n"}
    return f'<tr><th class="l">{_e(first)}</th>' + "".join(f"<th>{_e(heads[c])}</th>" for c in BLOCK_COLUMNS) + "</tr>"


def _group_table(entries: list[dict[str, Any]], title: str, limit: int | None = None) -> str:
    if not entries:
        return ""
    has_ar = any(e.get("ar_alone_fve_nrm") is not None for e in entries)
    head = f'<tr><th class="l">{_e(title)}</th><th>n</th><th>fve_nrm</th><th>mse_nrm</th><th>cosine</th>'
    head += "<th>AR alone fve_nrm</th></tr>" if has_ar else "</tr>"
    body = []
    shown = entries if limit is None or len(entries) <= 2 * limit else entries[:limit] + entries[-limit:]
    for e in shown:
        cells = f'<td class="l">{_e(e["key"])}</td><td>{e["n"]}</td>' + _num_cell(e["fve_nrm"], True)
        cells += _num_cell(e["mse_nrm"]) + _num_cell(e["cosine"])
        if has_ar:
            cells += _num_cell(e.get("ar_alone_fve_nrm"), True)
        body.append(f"<tr>{cells}</tr>")
    more = "" if shown is entries else f"<p><small>best and worst {limit} of {len(entries)} shown; all in metrics.json</small></p>"
    return f"<table>{head}{''.join(body)}</table>{more}"


def _context_cell(context: str | None, token: str | None, keep: int = 600) -> str:
    ctx = context or ""
    tok = token or ""
    if tok and ctx.endswith(tok):
        before, mark = ctx[: len(ctx) - len(tok)], tok
    else:
        before, mark = ctx, ""
    if len(before) > keep:
        before = "…" + before[-keep:]
    return f'<span class="ctx">{_e(before)}</span><mark>{_e(mark)}</mark>'


def render_html(m: dict[str, Any], samples: list[dict[str, Any]], plots: dict[str, bytes], html_samples: int) -> str:
    rt = m.get("round_trip") or {}
    base = m.get("baselines") or {}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>NLA eval report</title>"
             f"<style>{CSS}</style><script>{JS}</script></head><body>"]
    ds, bundle = m.get("dataset", {}), m.get("bundle", {})
    parts.append("<h1>NLA evaluation report</h1>")
    parts.append(
        f'<table id="run"><tr><th class="l">bundle</th><td class="l">{_e(bundle.get("path"))} '
        f'({_e(bundle.get("base_model"))}, layer {_e(bundle.get("layer_index"))}, d={_e(bundle.get("d_model"))})</td></tr>'
        f'<tr><th class="l">dataset</th><td class="l">{_e(ds.get("path"))} — split {_e(ds.get("split"))}, '
        f'{_e(ds.get("rows_evaluated"))} of {_e(ds.get("rows_in_split"))} rows, {_e(ds.get("labelled_rows"))} with teacher labels</td></tr>'
        f'<tr><th class="l">created</th><td class="l">{_e(m.get("created"))} · nla {_e(m.get("nla_version"))} · '
        f'schema {_e(m.get("schema_version"))} · {_e(fmt((m.get("timing_s") or {}).get("total"), 1))} s</td></tr></table>'
    )
    if m.get("notes"):
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in m["notes"]) + "</ul>")

    parts.append("<h2>Headline</h2><p><small>fve_nrm is the headline (docs/design.md §6): 0 = no better than the training mean, "
                 "1 = perfect. Intervals: 95% bootstrap over samples. top-1: the true vector is the nearest of "
                 f"{_e(rt.get('n_candidates'))} candidates (chance {fmt(1 / rt['n_candidates']) if rt.get('n_candidates') else '—'}).</small></p>")
    bk = rt.get("best_of_k")
    rows = [_block_row("AR alone (teacher labels)", m.get("ar_alone")), _block_row("Round trip AV → AR", rt)]
    if isinstance(bk, dict):
        rows.append(_block_row(f"Round trip, best of {bk.get('k')}", bk, f"(oracle pick; T={bk.get('temperature')})"))
    parts.append(f'<table id="headline">{_block_header("block")}{"".join(rows)}</table>')

    ridge = base.get("bow_ridge") or {}
    mean_dir = base.get("mean_direction") or {}
    parts.append("<h2>Baselines</h2>")
    check = mean_dir.get("check_fve_meannorm_zero")
    parts.append(f"<p><small>Mean direction check (fve_meannorm = 0 by construction): "
                 f"<b>{'passed' if check else 'FAILED'}</b>.</small></p>")
    rows = [
        _block_row("Round trip AV → AR (for reference)", rt),
        _block_row("Mean direction (floor)", mean_dir),
        _block_row("Shuffled activations", base.get("shuffled_activations")),
        _block_row("BoW ridge on AV explanations", ridge.get("on_av") if ridge.get("available") else ridge,
                   f"(λ={ridge.get('lambda')}, {ridge.get('vocab_size')} words)" if ridge.get("available") else ""),
        _block_row("BoW ridge on teacher labels", ridge.get("on_teacher") if ridge.get("available") else ridge),
        _block_row("AR alone (for reference)", m.get("ar_alone")),
    ]
    parts.append(f'<table id="baselines">{_block_header("predictor")}{"".join(rows)}</table>')

    parts.append("<h2>Faithfulness probes</h2>")
    pr = m.get("probes") or {}
    if not pr.get("enabled"):
        parts.append("<p class='muted'>probes not run (--no-probes)</p>")
    else:
        ca = pr.get("claim_ablation") or {}
        pt = pr.get("paraphrase_teacher") or {}
        prow = [
            ("paraphrase (deterministic rules)", pr.get("paraphrase", {}).get("fve_nrm"), pr.get("paraphrase", {}).get("delta_fve_nrm"), ""),
            ("paraphrase (teacher)", pt.get("fve_nrm"), pt.get("delta_fve_nrm"), pt.get("note") or ("" if pt.get("available") else "no teacher configured")),
            ("word shuffle", pr.get("word_shuffle", {}).get("fve_nrm"), pr.get("word_shuffle", {}).get("delta_fve_nrm"), ""),
            ("drop one claim (mean over claims)", None, ca.get("delta_fve_nrm"), ca.get("note") or ""),
        ]
        prow += [(f"drop claim {e['index'] + 1}", None, e["delta_fve_nrm"], f"n={e['n']}") for e in ca.get("per_claim_index", [])]
        body = "".join(f'<tr><td class="l">{_e(a)}</td>{_num_cell(b)}{_num_cell(c, True)}<td class="l"><small>{_e(d)}</small></td></tr>'
                       for a, b, c, d in prow)
        parts.append(f'<p><small>Unedited round-trip fve_nrm: {fmt(pr.get("base_fve_nrm"))}. A faithful AR keeps its FVE under '
                     'paraphrase and loses it when claims go; a word shuffle that costs nothing means word identity alone carries the vector.</small></p>'
                     f'<table id="probes"><tr><th class="l">probe</th><th>fve_nrm</th><th>Δ fve_nrm</th><th class="l">note</th></tr>{body}</table>')

    parts.append(_causal_section(m.get("causal") or {}))

    parts.append("<h2>Explanation quality</h2>")
    q = (m.get("quality") or {}).get("av") or {}
    qt = (m.get("quality") or {}).get("teacher") or {}
    lw, tw = q.get("length_words") or {}, qt.get("length_words") or {}
    judge = q.get("judge") or {}
    qrows = [
        ("length, words (mean / median / p10–p90)",
         f"{fmt(lw.get('mean'), 1)} / {fmt(lw.get('median'), 1)} / {fmt(lw.get('p10'), 0)}–{fmt(lw.get('p90'), 0)}",
         f"{fmt(tw.get('mean'), 1)} / {fmt(tw.get('median'), 1)} / {fmt(tw.get('p10'), 0)}–{fmt(tw.get('p90'), 0)}" if tw else "—"),
        ("distinct-explanation rate", fmt(q.get("distinct_rate")), fmt(qt.get("distinct_rate")) if qt else "—"),
        ("unparseable rate", fmt(q.get("unparseable_rate")), "—"),
        ("truncated rate", fmt(q.get("truncated_rate")), "—"),
        ("LLM judge, mean specificity 1–5", fmt(judge.get("mean_score")) if judge.get("available") else _e(judge.get("note") or "—"), "—"),
    ]
    parts.append('<table id="quality"><tr><th class="l">signal</th><th>AV</th><th>teacher</th></tr>'
                 + "".join(f'<tr><td class="l">{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td></tr>' for a, b, c in qrows) + "</table>")
    if q.get("top_openings"):
        parts.append('<p><small>Most frequent openings (first four words; one phrase everywhere = template collapse):</small></p>'
                     '<table id="openings"><tr><th class="l">opening</th><th>count</th><th>fraction</th></tr>'
                     + "".join(f'<tr><td class="l">{_e(o["phrase"])}</td><td>{o["count"]}</td><td>{fmt(o["fraction"])}</td></tr>'
                               for o in q["top_openings"]) + "</table>")

    parts.append('<h2>Plots</h2><div class="plots">')
    for name, data in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<img id="plot-{_e(name)}" alt="{_e(name)}" src="{uri}">')
    parts.append("</div>")

    br = m.get("breakdowns") or {}
    parts.append("<h2>Breakdowns</h2>")
    parts.append(_group_table(br.get("position_bucket") or [], "position"))
    for col, entries in (br.get("category") or {}).items():
        parts.append(_group_table(entries, col))
    parts.append(_group_table(br.get("document") or [], "document", limit=15))

    shown = samples[: max(0, html_samples)]
    parts.append(f"<h2>Samples</h2><p><small>{len(shown)} of {len(samples)} shown (all in samples.jsonl). "
                 "Click a header to sort. The highlighted token is the sampled position.</small> "
                 '<input id="filter" placeholder="filter…" oninput="filterSamples()"></p>')
    heads = ["#", "document", "pos", "context", "teacher label", "AV explanation", "fve_nrm", "AR alone fve", "top-1"]
    parts.append('<table id="samples"><thead><tr>' + "".join(
        f'<th onclick="sortSamples({i})">{_e(h)}</th>' for i, h in enumerate(heads)) + "</tr></thead><tbody>")
    for s in shown:
        av = s.get("av_explanation")
        av_cell = _e(av) if av is not None else f'<span class="muted">(unparseable)</span> {_e(s.get("av_raw"))}'
        parts.append(
            f'<tr><td>{s["index"]}</td><td class="l">{_e(s.get("doc_id"))}</td><td>{_e(s.get("position"))}</td>'
            f'<td class="l">{_context_cell(s.get("context"), s.get("token"))}</td>'
            f'<td class="l">{_e(s.get("teacher_explanation") or "—")}</td><td class="l">{av_cell}</td>'
            f'<td data-v="{s["fve_nrm"]}">{fmt(s["fve_nrm"])}</td>'
            f'<td data-v="{s.get("ar_alone_fve_nrm") if s.get("ar_alone_fve_nrm") is not None else ""}">{fmt(s.get("ar_alone_fve_nrm"))}</td>'
            f'<td>{fmt(s.get("top1_hit"))}</td></tr>'
        )
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts)


def _causal_section(c: dict[str, Any]) -> str:
    """The causal block (nla/eval/causal.py): KLs, fraction recovered, per-claim ΔKL."""
    head = "<h2>Causal faithfulness</h2>"
    if not c.get("enabled"):
        return head + "<p class='muted'>causal block not run (--no-causal)</p>"
    kl = c.get("kl") or {}
    rows = [
        ("reconstruction of the AV's explanation", kl.get("reconstruction"), c.get("fraction_recovered"), ""),
        ("mean ablation (μ patched in)", kl.get("mean_ablation"), 0.0 if kl.get("mean_ablation") else None, "floor, 0 % by definition"),
        ("true vector (zero effect)", kl.get("true_vector"), c.get("fraction_recovered_true_vector"), "check: ≈ 0 KL, 100 %"),
        ("another row's reconstruction", kl.get("shuffled_reconstruction"), c.get("fraction_recovered_shuffled"), "control"),
    ]
    ca = c.get("claim_ablation") or {}
    rows.append(("drop one claim (mean ΔKL)", ca.get("delta_kl"), None, f"{ca.get('rows_with_claims', 0)} rows with 2+ claims"))
    rows += [(f"drop claim {e['index'] + 1} (ΔKL)", e["delta_kl"], None, f"n={e['n']}") for e in ca.get("per_claim_index", [])]
    body = "".join(f'<tr><td class="l">{_e(a)}</td>{_num_cell(b)}{_num_cell(f)}<td class="l"><small>{_e(d)}</small></td></tr>'
                   for a, b, f, d in rows)
    return (head + f"<p><small>Each vector is patched back into the base model at layer K (rescaled to the clean state's norm) "
            f"and the next-token distribution compared with the clean one over {_e(c.get('n'))} rows. Fraction recovered = "
            "1 − KL(patch)/KL(mean ablation). A positive ΔKL when a claim is dropped means the model uses what it said.</small></p>"
            f'<table id="causal"><tr><th class="l">patched vector</th><th>KL (nats)</th><th>fraction recovered</th>'
            f'<th class="l">note</th></tr>{body}</table>')


# --------------------------------------------------------------------------- compare
def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """A side-by-side text table of the headline numbers of two reports, with B − A."""
    rows = [("metric", name_a, name_b, "B − A")]
    for label, path in COMPARE_ROWS:
        va, vb = lookup(a, path), lookup(b, path)
        if va is None and vb is None:
            continue
        delta = "—"
        if isinstance(va, int) and isinstance(vb, int) and not isinstance(va, bool):
            delta = f"{vb - va:+d}"
        elif isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            delta = f"{vb - va:+.3f}"
        rows.append((label, fmt(va), fmt(vb), delta))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
