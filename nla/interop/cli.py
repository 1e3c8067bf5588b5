"""`nla import` (a published layout → our bundle) and `nla releases` (the registry)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nla.cli import add_device_flag


def cmd_import(args: Any) -> None:
    from nla.config import check_device, claim_bundle_folder
    from nla.interop.load import import_layout

    # The shared output guard, before anything is fetched or loaded: an import never deletes a
    # folder it did not write (a notes file, a dataset), and replaces a bundle only with --force.
    claim_bundle_folder(args.out, command="import", force=args.force)
    check_device(args.device, "--device")
    try:
        _import(args, import_layout)
    except BaseException as exc:
        from nla.bundle_cli import disk_error

        # A failed write (full disk) must not leave the bundle's temp folder behind.
        shutil.rmtree(Path(args.out).with_name(Path(args.out).name + ".tmp"), ignore_errors=True)
        raise disk_error(exc, Path(args.out)) from None


def _import(args: Any, import_layout: Any) -> None:
    obj = import_layout(args.source, args.out, layout=args.layout, ar=args.ar, base_model=args.base_model,
                        injection=args.injection, inject_layer=args.inject_layer, inject_coef=args.inject_coef,
                        injection_scale=args.injection_scale, ar_layer=args.ar_layer, depth_pct=args.depth_pct,
                        layer=args.layer, load_in_4bit=args.load_in_4bit, dtype=args.dtype, device=args.device)
    nla = getattr(obj, "nla", obj)
    meta = nla.meta
    extra = f", models {', '.join(obj.tags)}" if hasattr(obj, "tags") else ""
    print(f"{args.out}: imported {meta.extra.get('imported_from', {}).get('layout', 'bundle')} layout — "
          f"base {meta.base_model}, layer {meta.layer_index}, d_model {meta.d_model}, "
          f"injection {meta.injection.mode}{extra}")


def cmd_releases(args: Any) -> None:
    from nla.interop.registry import releases, releases_table

    entries = releases()
    if args.json:
        from dataclasses import asdict

        print(json.dumps({n: asdict(r) for n, r in entries.items()}, indent=2))
        return
    print(releases_table(entries))


def register(sub: Any) -> None:
    from nla.config import DTYPE_CHOICES

    p = sub.add_parser("import", help="turn a published NLA (paper, nanoNLA, anicka, Solshine, universal) into our bundle")
    p.add_argument("source", help="local folder, release name (see `nla releases`) or hub repo id")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--layout", default=None, choices=["bundle", "paper", "nanonla", "anicka", "solshine", "universal"],
                   help="expected layout (default: detected from the folder)")
    p.add_argument("--ar", default=None, help="the AR folder when SOURCE is the AV folder and the AR is not "
                   "next to it under the -av/-ar name")
    p.add_argument("--base-model", default=None, help="base model to record (default: from the sidecar); "
                   "explain() reads activations from it")
    p.add_argument("--injection", default=None, choices=["add", "replace"],
                   help="nanoNLA: the AV's injection, which its sidecar does not record (nanoNLA trains add)")
    p.add_argument("--inject-layer", type=int, default=None, help="nanoNLA additive injection block (default 1)")
    p.add_argument("--inject-coef", type=float, default=None, help="nanoNLA additive injection coefficient (default 1)")
    p.add_argument("--injection-scale", default=None, help="replace injection scale when the sidecar has none "
                   "(a number or sqrt_d_model)")
    p.add_argument("--ar-layer", type=int, default=None, help="Solshine: the block the AR reads (AR_TRUNCATION - 1)")
    p.add_argument("--depth-pct", type=int, default=None, help="anicka: the depth %% in the AV prompt")
    p.add_argument("--layer", type=int, default=None, help="universal: K of the AR trunk when ar/nla_meta.yaml lacks it")
    p.add_argument("--load-in-4bit", action="store_true", help="anicka/Solshine: 4-bit base for the AV (bitsandbytes)")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds a bundle")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype to load and write the weights in")
    add_device_flag(p)
    p.set_defaults(func=cmd_import)
    r = sub.add_parser("releases", help="list known released NLAs (names for NLA.from_pretrained / nla import)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_releases)
