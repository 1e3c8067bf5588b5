"""Search a dataset by text: the AR turns a description into a direction, the nearest stored
activations are the positions where the model's state matches the description.

`nla search --nla RUN --data D "a text"` prints them with their context, teacher label and
(``--explain``) the AV's explanation of each.

Ranking is by *centred* cosine, ``cos(p̂ − μ, v̂ − μ)`` with ``x̂ = sqrt(d) x / ‖x‖`` and μ the
training mean (docs/design.md §6). Residual streams are anisotropic: every vector shares a
large mean component, so a raw cosine ranks rows by how typical they are, whatever the query.
The raw cosine is reported next to it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.cli import add_device_flag
from nla.errors import NLAError

DEFAULT_K = 10
MAX_K = 1000


def normalized(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(d) x / ‖x‖`` row-wise (the space metrics and μ live in)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * x.shape[-1] ** 0.5


def concept_direction(nla: Any, text: str) -> torch.Tensor:
    """Unit vector of ``AR(text)`` minus the mean, in the normalised space: what the text
    says *beyond* the average state (steering adds it, search ranks by it)."""
    if not text.strip():
        raise NLAError("the query text is empty")
    pred = normalized(nla.reconstruct([text]).float()[0])
    mean = _mean(nla)
    d = pred - mean if mean is not None else pred
    return d / d.norm().clamp_min(1e-12)


def _mean(nla: Any) -> torch.Tensor | None:
    return nla.mean_vector.float() if getattr(nla, "mean_vector", None) is not None else None


@dataclass
class SearchIndex:
    """The rows of a dataset (one split or all), their normalised vectors and metadata."""

    path: str
    rows: list[dict[str, Any]]
    vectors: torch.Tensor  # normalised, [n, d]
    mean: torch.Tensor
    layer_index: int

    @classmethod
    def open(cls, path: str | Path, split: str | None = None) -> SearchIndex:
        from nla.data.store import SPLITS, VECTOR_COLUMN, ActivationDataset, arrow_to_vectors

        if split is not None and split not in SPLITS:
            raise NLAError(f"--split {split!r}: unknown split (splits: {', '.join(SPLITS)})")
        ds = ActivationDataset.open(path)
        table = ds.table(None, split=split)
        if table.num_rows == 0:
            raise NLAError(f"{path}: no rows{f' in split {split!r}' if split else ''} to search")
        vecs = torch.from_numpy(arrow_to_vectors(table.column(VECTOR_COLUMN), ds.d_model).copy())
        names = [n for n in ("doc_id", "position", "context", "split", "explanation") if n in table.column_names]
        return cls(str(path), table.select(names).to_pylist(), normalized(vecs), ds.mean_vector().float(), ds.meta.layer_index)

    def check(self, nla: Any) -> None:
        if self.vectors.shape[1] != nla.meta.d_model:
            raise NLAError(f"dataset {self.path} has d_model={self.vectors.shape[1]}, bundle has {nla.meta.d_model}")
        if self.layer_index >= 0 and self.layer_index != nla.meta.layer_index:
            raise NLAError(f"dataset {self.path} was extracted at layer {self.layer_index}, bundle reads layer {nla.meta.layer_index}")

    def nearest(self, query: torch.Tensor, k: int) -> list[tuple[int, float, float]]:
        """``(row, centred cosine, raw cosine)`` of the ``k`` rows nearest to ``query``."""
        q = normalized(query.float().reshape(1, -1))[0]
        centred = self.vectors - self.mean
        qc = q - self.mean
        score = centred @ qc / (centred.norm(dim=-1).clamp_min(1e-12) * qc.norm().clamp_min(1e-12))
        raw = self.vectors @ q / (self.vectors.norm(dim=-1) * q.norm()).clamp_min(1e-12)
        top = torch.topk(score, min(k, len(score)))
        return [(int(i), float(score[i]), float(raw[i])) for i in top.indices]


def search(nla: Any, index: SearchIndex, text: str, k: int = DEFAULT_K, explain: bool = False,
           max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """The ``k`` dataset positions nearest to ``AR(text)``, best first."""
    if not 1 <= k <= MAX_K:
        raise NLAError(f"k must be between 1 and {MAX_K}, got {k}")
    if not text.strip():
        raise NLAError("the query text is empty")
    if explain and max_new_tokens < 1:
        raise NLAError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    index.check(nla)
    query = nla.reconstruct([text]).float()[0]
    hits = index.nearest(query, k)
    out = []
    for rank, (i, score, raw) in enumerate(hits, 1):
        row = index.rows[i]
        out.append({"rank": rank, "row": i, "doc_id": row.get("doc_id"), "position": row.get("position"),
                    "split": row.get("split"), "context": row.get("context"), "teacher_label": row.get("explanation"),
                    "score": score, "cosine": raw, "av_explanation": None})
    if explain and out:
        vecs = index.vectors[[h["row"] for h in out]]
        answers = nla.verbalize(vecs, n=1, max_new_tokens=max_new_tokens)
        for h, a in zip(out, answers):
            h["av_explanation"] = a[0].explanation if a[0].explanation is not None else a[0].raw
    return out


def _short(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else "…" + text[-(width - 1):]


def cmd_search(args: argparse.Namespace) -> int:
    from nla.bundle import NLA

    index = SearchIndex.open(args.data, args.split)
    from nla.config import check_device

    check_device(args.device, "--device")  # a missing GPU is one line here, not a CUDA traceback
    nla = NLA.from_pretrained(args.nla, device=args.device)
    hits = search(nla, index, args.text, k=args.k, explain=args.explain, max_new_tokens=args.max_new_tokens)
    if args.json:
        import json

        print(json.dumps({"query": args.text, "hits": hits}, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(hits)} positions of {args.data} nearest to AR({args.text!r}) (score: centred cosine; cos: raw)")
    for h in hits:
        print(f"{h['rank']:>3}. score={h['score']:+.3f} cos={h['cosine']:+.3f}  {h['doc_id']}@{h['position']}  "
              f"…{_short(h['context'], 70)!r}")
        if h["teacher_label"]:
            print(f"     teacher: {_short(h['teacher_label'], 110)}")
        if h["av_explanation"] is not None:
            print(f"     AV:      {_short(h['av_explanation'], 110)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="find the dataset positions whose activations match a text (via the AR)",
        description="The AR maps TEXT to a vector; the dataset rows nearest to it (centred cosine, "
        "cos(p̂ − μ, v̂ − μ)) are listed with their context, teacher label and, with --explain, the AV's "
        "explanation. The dataset's layer K (output of decoder block K = hidden_states[K+1]) must be the bundle's.",
    )
    p.add_argument("text", help="what to look for, in words (as an explanation would say it)")
    p.add_argument("--nla", required=True, help="NLA bundle folder")
    p.add_argument("--data", required=True, help="activation dataset folder (or single .parquet file)")
    p.add_argument("--split", default=None, help="search only this split (default: all rows)")
    p.add_argument("-k", type=int, default=DEFAULT_K, help="how many positions to list")
    p.add_argument("--explain", action="store_true", help="also verbalize each hit with the AV")
    p.add_argument("--max-new-tokens", type=int, default=48, help="AV generation budget with --explain")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_flag(p)
    p.set_defaults(func=cmd_search)
