"""Import overhead: loading a paper-layout checkpoint pair vs loading the same weights as our bundle.

    python benchmarks/interop.py [--model tiny:qwen2] [--layer 2] [--rounds 5]

Writes the paper's released layout (AV folder + AR folder cut to K + 1 blocks, each with its
own ``nla_meta.yaml``) from ``--model``, imports it once into our bundle, then times, round by
round and interleaved so a noisy machine slows both alike:

* **import** — ``nla.interop.import_layout(AV_DIR, ar=AR_DIR)``: sidecar validation, live marker
  and suffix checks, AV + AR + value head loading;
* **bundle** — ``NLA.from_pretrained(BUNDLE)`` on the bundle written from that import.

Prints the medians and the ratio import/bundle (target: ≤ 1.2, i.e. the checks cost little
next to reading the weights).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml


def write_paper_pair(model: str, layer: int, root: Path) -> tuple[Path, Path]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from nla.models.injection import find_marker
    from nla.models.loading import resolve_model_path
    from nla.models.prompts import encode_rendered, render_chat

    src = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(src)
    av_dir, ar_dir = root / "nla-av", root / "nla-ar"
    av = AutoModelForCausalLM.from_pretrained(src)
    av.save_pretrained(av_dir)
    tok.save_pretrained(av_dir)
    ar = AutoModel.from_pretrained(src)
    del ar.layers[layer + 1:]
    ar.config.num_hidden_layers = layer + 1
    if isinstance(getattr(ar.config, "layer_types", None), list):
        ar.config.layer_types = ar.config.layer_types[: layer + 1]
    ar.norm = torch.nn.Identity()
    ar.save_pretrained(ar_dir)
    tok.save_pretrained(ar_dir)
    d = av.config.hidden_size
    from safetensors.torch import save_file

    save_file({"weight": torch.eye(d)}, str(ar_dir / "value_head.safetensors"))
    template = "Thought: <concept>{injection_char}</concept>\nExplain."
    tokens = find_marker(lambda m: render_chat(tok, template.format(injection_char=m)),
                         lambda t: encode_rendered(tok, t), tok)
    common = {"kind": "nla_model", "schema_version": 2, "d_model": d, "extraction_layer_index": layer,
              "extraction": {"injection_scale": "sqrt_d_model", "mse_scale": "sqrt_d_model"},
              "tokens": {"injection_char": tokens.marker, "injection_token_id": tokens.marker_id,
                         "injection_left_neighbor_id": tokens.left_id, "injection_right_neighbor_id": tokens.right_id},
              "prompt_templates": {"av": template, "ar": "{explanation}\nThe thought:"}}
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump({**common, "role": "av"}, allow_unicode=True))
    (ar_dir / "nla_meta.yaml").write_text(yaml.safe_dump({**common, "role": "ar"}, allow_unicode=True))
    return av_dir, ar_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:qwen2", help="source model for the paper-layout pair")
    ap.add_argument("--layer", type=int, default=2, help="K = output of decoder block K")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from nla.bundle import NLA
    from nla.interop import import_layout

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        av_dir, ar_dir = write_paper_pair(args.model, args.layer, root)
        bundle = root / "bundle"
        import_layout(av_dir, bundle, ar=ar_dir, device="cpu")  # warm-up + the bundle to compare with
        NLA.from_pretrained(bundle, device="cpu")
        times: dict[str, list[float]] = {"import": [], "bundle": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            import_layout(av_dir, ar=ar_dir, device="cpu")
            times["import"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            NLA.from_pretrained(bundle, device="cpu")
            times["bundle"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, layer {args.layer}, {args.rounds} rounds (median seconds)")
    print(f"  import paper layout : {med['import']:.3f}")
    print(f"  load our bundle     : {med['bundle']:.3f}")
    print(f"  ratio import/bundle : {med['import'] / med['bundle']:.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
