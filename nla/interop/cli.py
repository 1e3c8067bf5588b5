"""`nla import` (a published layout → our bundle) and `nla releases` (the registry)."""

from __future__ import annotations

import json
from typing import Any


def cmd_import(args: Any) -> None:
    from nla.interop.registry import import_layout

    obj = import_layout(args.source, args.out, layout=args.layout, ar=args.ar, base_model=args.base_model,
                        dtype=args.dtype, device=args.device)
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
        print(json.dumps({n: r.__dict__ for n, r in entries.items()}, indent=2))
        return
    print(releases_table(entries))
    print("\nstatus 'example' = a layout example under a plausible name, not known to exist on the hub.")


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="turn a published NLA (paper, nanoNLA, PEFT pair, universal) into our bundle")
    p.add_argument("source", help="local folder, release name (see `nla releases`) or hub repo id")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--layout", default=None, choices=["paper", "nanonla", "peft_pair", "universal", "bundle"],
                   help="expected layout (default: detected from the folder)")
    p.add_argument("--ar", default=None, help="paper layout: the AR folder when SOURCE is the AV folder")
    p.add_argument("--base-model", default=None, help="base model to record (default: from the sidecar)")
    p.add_argument("--dtype", default="float32", help="dtype to load and write the weights in")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_import)
    r = sub.add_parser("releases", help="list known released NLAs (names for NLA.from_pretrained / nla import)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_releases)
