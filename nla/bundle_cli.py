"""`nla init`, `nla verbalize`, `nla reconstruct`: make a bundle and use one from the shell."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from nla.cli import add_device_flag
from nla.config import DTYPE_CHOICES, check_device, claim_bundle_folder
from nla.errors import NLAError


def _check_text(text: str, what: str) -> None:
    """Text a tokenizer can read: bytes that were not UTF-8 on the command line arrive as lone
    surrogates (Python's surrogateescape) and would fail deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NLAError(f"{what}: not valid UTF-8 text (bad byte at character {exc.start})") from None


def save_or_clean(obj: Any, out: Path) -> None:
    """``obj.save_pretrained(out)``; a failed write (full disk) takes its temp folder with it, so
    nothing half-written is left next to ``out``."""
    import shutil

    try:
        obj.save_pretrained(out)
    except BaseException as exc:
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)
        raise disk_error(exc, out) from None


def disk_error(exc: BaseException, out: Path) -> BaseException:
    """A full disk as an :class:`NLAError` naming ``out`` (safetensors and transformers report it
    without the path, some as a RuntimeError); any other exception unchanged."""
    full = os.strerror(errno.ENOSPC)
    if getattr(exc, "errno", None) == errno.ENOSPC or full in str(exc) or "os error 28" in str(exc):
        return NLAError(f"{out}: {full} while writing (free some space, or write elsewhere)")
    return exc


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_init(args: Any) -> None:
    from nla.bundle import NLA, LoraSettings

    out = Path(args.out)
    if args.lora_r < 0:
        raise NLAError(f"--lora-r must be 0 (full) or a positive rank, got {args.lora_r}")
    if args.injection_scale is not None and not (math.isfinite(args.injection_scale) and args.injection_scale > 0):
        raise NLAError(f"--injection-scale must be a positive finite number, got {args.injection_scale}")
    # A bundle folder may hold a trained run: never replace one by an untrained bundle by accident.
    claim_bundle_folder(out, command="init", force=args.force)
    nla = NLA.initialize(
        args.model, dataset=args.data, layer=args.layer, injection_mode=args.injection,
        injection_scale=args.injection_scale, lora=LoraSettings(r=args.lora_r) if args.lora_r else None,
    )
    save_or_clean(nla, out)
    print(f"{args.out}: untrained bundle for {nla.meta.base_model}, layer {nla.meta.layer_index}, "
          f"marker {nla.meta.tokens.marker!r} (id {nla.meta.tokens.marker_id})")


def cmd_verbalize(args: Any) -> None:
    from nla.bundle import NLA, load_vectors

    # Argument mistakes are reported before the (slow) model load.
    if args.position is not None and args.text is None:
        raise NLAError("--position needs --text (it picks a token of that text)")
    if args.n < 1:
        raise NLAError(f"--n must be at least 1, got {args.n}")
    if args.max_new_tokens < 1:
        raise NLAError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_device(args.device, "--device")
    if args.text is not None:
        _check_text(args.text, "--text")
    vectors = load_vectors(args.vectors) if args.vectors else None
    nla = NLA.from_pretrained(args.nla, device=args.device, dtype=args.dtype)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.n > 1 or args.sample, seed=args.seed)
    if vectors is not None:
        nla.check_vectors(vectors)
        outs = nla.verbalize(vectors, n=args.n, **gen)
        rows: list[dict[str, Any]] = [{"index": i, "explanations": [o.explanation for o in out], "raw": [o.raw for o in out]}
                for i, out in enumerate(outs)]
    elif args.text is not None:
        positions = [args.position] if args.position is not None else None
        rows = nla.explain(args.text, positions, **gen)
    else:
        raise NLAError("verbalize: give --vectors FILE or --text T")
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        if "explanations" in row:
            for e, raw in zip(row["explanations"], row["raw"]):
                print(f"[{row['index']}] {e if e is not None else '(unparseable) ' + raw}")
        else:
            fve = f"  fve_nrm={row['fve_nrm']:.3f}" if "fve_nrm" in row else ""
            print(f"[{row['position']}] {row['token']!r}: {row['explanation'] or '(unparseable) ' + row['raw']}"
                  f"  (mse_nrm={row['mse_nrm']:.3f}{fve})")


def cmd_reconstruct(args: Any) -> None:
    from nla.bundle import NLA

    check_device(args.device, "--device")
    for i, text in enumerate(args.texts):
        _check_text(text, f"text {i + 1}")
    if args.out and Path(args.out).is_dir():
        raise NLAError(f"--out {args.out}: is a folder; give a .safetensors file path")
    nla = NLA.from_pretrained(args.nla, device=args.device, dtype=args.dtype)
    vecs = nla.reconstruct(args.texts)
    if not torch.isfinite(vecs).all():
        # JSON has no NaN: printing one would be invalid JSON with exit status 0.
        raise NLAError(f"{args.nla}: the reconstructor returned non-finite values (NaN/inf); its weights or "
                       "value head are damaged")
    if args.out:
        from safetensors.torch import save_file

        # Atomic: a full disk leaves the old file (or none), never half a tensor file.
        tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")
        try:
            save_file({"vectors": vecs.contiguous()}, str(tmp))
            os.replace(tmp, args.out)
        finally:
            tmp.unlink(missing_ok=True)
    if args.json or not args.out:
        _print_json([{"text": t, "vector": v.tolist(), "norm": float(torch.linalg.norm(v))}
                     for t, v in zip(args.texts, vecs)])


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="an untrained bundle (AV + AR + sidecar) from a base model and dataset")
    p.add_argument("--model", default=None, help="base model (default: the dataset's, else SmolLM2-135M)")
    p.add_argument("--data", default=None, help="activation dataset (gives layer, injection scale, mean vector)")
    p.add_argument("--layer", type=int, default=None,
                   help="layer K = output of decoder block K (0-based) = hidden_states[K+1]")
    p.add_argument("--injection", default="replace", choices=["replace", "add"])
    p.add_argument("--injection-scale", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=0, help="wrap AV/AR in LoRA adapters of this rank (0: full)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds a bundle")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("verbalize", help="vectors (or a text's positions) → explanations")
    p.add_argument("--nla", required=True, help="bundle folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--vectors", help=".safetensors, .npy or .pt file of [n, d] or [d] vectors")
    g.add_argument("--text", help="run the base model on this text and verbalize its positions")
    p.add_argument("--position", type=int, default=None, help="token position in --text (default: all)")
    p.add_argument("--n", type=int, default=1, help="samples per vector")
    p.add_argument("--sample", action="store_true", help="sample even with --n 1 (default greedy)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    add_device_flag(p)
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype to load the bundle in")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verbalize)

    p = sub.add_parser("reconstruct", help="explanations → vectors")
    p.add_argument("--nla", required=True, help="bundle folder")
    p.add_argument("texts", nargs="+", help="explanation texts")
    p.add_argument("--out", default=None, help="write the vectors to this .safetensors file")
    add_device_flag(p)
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype to load the bundle in")
    p.add_argument("--json", action="store_true", help="print JSON (default when --out is not given)")
    p.set_defaults(func=cmd_reconstruct)
