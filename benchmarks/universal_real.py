"""Wrap a plain (anchor-only) NLA bundle as a universal trunk, for the held-out setting of
docs/design.md §9 on real weights (docs/benchmarks.md, "Universal").

`nla universal train` builds its trunk itself; this script instead takes an existing bundle
that was trained on the anchor model alone (e.g. the embedded default's `nla run` output) and
writes it as a universal bundle whose only tag is the anchor (identity enc/dec, marked
``trained: true``). Every other model is then *held out*: the trunk never saw it. The rest is
the ordinary CLI (see docs/universal.md, "Held-out models on an existing bundle")::

    nla universal extract --out U --models smollm2-135m=default gemma3-270m --docs 200 \\
        --positions-per-doc 16 --min-position 50 --seq-len 256 --device cpu
    python benchmarks/universal_real.py --trunk runs/default/sft --data U --out B
    nla universal fit-dec --nla B --data U --model smollm2-135m --rows 96 --max-new-tokens 110 --device cpu
    nla universal fit-enc --data U --model gemma3-270m --ridge 0.01
    nla universal fit-dec --nla B --data U --model gemma3-270m --rows 96 --max-new-tokens 110 --device cpu
    nla universal eval --nla B --data U --rows 32 --max-new-tokens 110 --device cpu --out eval.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nla.bundle import NLA
from nla.errors import NLAError
from nla.universal.bundle import UniversalNLA
from nla.universal.extract import UniversalData


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trunk", required=True, help="plain NLA bundle trained on the anchor model only")
    p.add_argument("--data", required=True, help="universal extraction folder (`nla universal extract`)")
    p.add_argument("--out", required=True, help="where to write the universal bundle")
    args = p.parse_args()

    started = time.perf_counter()
    data = UniversalData(args.data)
    anchor = data.anchor
    info = data.models.get(anchor) or {}
    nla = NLA.from_pretrained(args.trunk, device="cpu")
    if "universal" in (nla.meta.extra or {}):
        raise NLAError(f"{args.trunk}: already a universal bundle")
    if (nla.meta.base_model, nla.meta.layer_index, nla.meta.d_model) != (info.get("model"), info.get("layer"),
                                                                          info.get("d_model")):
        raise NLAError(f"{args.trunk}: trunk is {nla.meta.base_model} layer {nla.meta.layer_index} "
                       f"(d={nla.meta.d_model}); the extraction's anchor {anchor!r} is {info.get('model')} "
                       f"layer {info.get('layer')} (d={info.get('d_model')})")
    models = {anchor: {"model": info.get("model"), "layer": info.get("layer"), "d_model": info.get("d_model"),
                       "trained": True, "trunk": str(args.trunk)}}
    u = UniversalNLA(nla, anchor, {}, models)  # the anchor: identity enc/dec until fit-dec replaces dec
    u.save_pretrained(Path(args.out))
    print(f"{args.out}: universal bundle, trunk {args.trunk} ({nla.meta.base_model}, layer {nla.meta.layer_index}), "
          f"anchor {anchor!r} (trained), {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
