"""Steer the base model by text: the AR's direction for a concept, added at layer K.

`nla steer --nla RUN "a concept" --prompt P --scale 0,0.5,1,2` generates from the prompt once
per scale with ``h ← h + a · ‖h‖ · u`` at the output of decoder block K (docs/design.md §2)
for every position after the first, where ``u`` is the unit vector of ``AR(concept)`` minus
the training mean (normalised space, docs/design.md §6): the mean is what every explanation
shares, so subtracting it leaves what this concept adds. The step is in units of each
position's own norm (the additive injection rule of docs/design.md §4), because residual
norms differ by orders of magnitude between positions and a fixed step would be negligible
at some and overwhelming at others. Position 0 is left alone: it is the attention sink, whose
huge norm would turn the same relative step into a catastrophe for every later token.

Each scale's steered state at the last prompt position is then verbalized by the AV; the
dose–response table says whether the concept shows up in what the AV reads there (the
projection on ``u`` of the state and of ``AR(explanation)``, and the share of the concept's
words the explanation uses) and in what the model writes. The projection is
``(x̂ − μ)·u / sqrt(d)``: 0 for a state no more along ``u`` than the mean, rising
monotonically with the scale for the steered state (a centred *cosine* does not: a huge step
makes ``x̂ → sqrt(d)·u``, whose centred cosine with ``u`` is below 1 and can dip).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from nla.cli import add_device_flag
from nla.errors import NLAError
from nla.models.layers import decoder_blocks
from nla.search import concept_direction, normalized

DEFAULT_SCALES = "0,0.5,1,2"
MAX_SCALES = 16
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(["a", "an", "the", "of", "to", "in", "on", "and", "or", "for", "with", "is", "are", "be", "as", "at", "by", "this", "that", "it", "its", "from"])


def parse_scales(spec: str) -> list[float]:
    try:
        scales = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise NLAError(f"--scale {spec!r}: expected comma-separated numbers such as 0,0.5,1") from None
    if not scales or len(scales) > MAX_SCALES:
        raise NLAError(f"--scale {spec!r}: give 1 to {MAX_SCALES} numbers")
    if any(not abs(s) < 1e6 for s in scales):
        raise NLAError(f"--scale {spec!r}: scales must be finite")
    return scales


def concept_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def word_overlap(concept: str, text: str | None) -> float | None:
    """Share of the concept's content words that ``text`` uses (None: no content words)."""
    words = concept_words(concept)
    if not words:
        return None
    return len(words & concept_words(text or "")) / len(words)


def projection(vectors: torch.Tensor, unit: torch.Tensor, mean: torch.Tensor | None) -> list[float]:
    """``(x̂ − μ)·u / sqrt(d)`` per row."""
    v = normalized(vectors)
    if mean is not None:
        v = v - mean
    return (v @ unit / vectors.shape[-1] ** 0.5).tolist()


@torch.no_grad()
def steer(nla: Any, concept: str, prompt: str, scales: list[float], *, max_new_tokens: int = 40,
          chat: bool = False, verbalize: bool = True, av_new_tokens: int = 48) -> dict[str, Any]:
    """Generate from ``prompt`` once per scale with the concept added at layer K; verbalize the
    steered states. Returns ``{"concept", "prompt", "layer_index", "rows": [...]}``."""
    from nla.eval.causal import base_lm
    from nla.models.prompts import encode_rendered

    if not prompt:
        raise NLAError("--prompt is empty")
    if max_new_tokens < 1 or av_new_tokens < 1:
        raise NLAError(f"--max-new-tokens and --av-new-tokens must be at least 1, got {max_new_tokens} and {av_new_tokens}")
    unit = concept_direction(nla, concept)
    if chat:
        if not getattr(nla.tokenizer, "chat_template", None):
            raise NLAError("--chat: the tokenizer has no chat template")
        rendered = nla.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
        ids = encode_rendered(nla.tokenizer, rendered)
    else:
        ids = nla.tokenizer.encode(prompt, add_special_tokens=True)
    n = len(scales)
    captured: list[torch.Tensor] = []
    with base_lm(nla) as model:
        dev = next(model.parameters()).device
        a = torch.tensor(scales, dtype=torch.float32, device=dev).view(n, 1, 1)
        u = unit.to(dev)

        def hook(_m: torch.nn.Module, _inp: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            h = hidden.float()
            step = a * h.norm(dim=-1, keepdim=True) * u
            if not captured:  # the prompt pass: leave the attention sink at position 0 as it is
                step[:, :1] = 0.0
            h = h + step
            if not captured:
                captured.append(h[:, -1].detach().cpu())
            hidden = h.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = decoder_blocks(model)[nla.meta.layer_index].register_forward_hook(hook)
        try:
            batch = torch.tensor([ids] * n, device=dev)
            pad = nla.tokenizer.pad_token_id if nla.tokenizer.pad_token_id is not None else nla.tokenizer.eos_token_id
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        finally:
            handle.remove()
    texts = [nla.tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out.tolist()]
    states = captured[0]
    mean = nla.mean_vector.float() if nla.mean_vector is not None else None
    state_proj = projection(states, unit, mean)
    rows: list[dict[str, Any]] = []
    explanations: list[str | None] = [None] * n
    recon_proj: list[float | None] = [None] * n
    if verbalize:
        answers = nla.verbalize(states, n=1, max_new_tokens=av_new_tokens)
        explanations = [a[0].explanation if a[0].explanation is not None else a[0].raw for a in answers]
        recon_proj = list(projection(nla.reconstruct([e or "" for e in explanations]).float(), unit, mean))
    for i, s in enumerate(scales):
        rows.append({"scale": s, "generation": texts[i], "state_concept": state_proj[i],
                     "av_explanation": explanations[i], "explanation_concept": recon_proj[i],
                     "explanation_word_overlap": word_overlap(concept, explanations[i]) if verbalize else None,
                     "generation_word_overlap": word_overlap(concept, texts[i])})
    return {"concept": concept, "prompt": prompt, "layer_index": nla.meta.layer_index, "chat": chat, "rows": rows}


def dose_response_table(result: dict[str, Any], width: int = 60) -> str:
    """The result as a markdown table (one row per scale)."""
    def cell(x: Any) -> str:
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:+.3f}"
        text = " ".join(str(x).split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [f"Steering with AR({result['concept']!r}) − μ at layer {result['layer_index']}; prompt {result['prompt']!r}", "",
             "| scale | state along concept | AR(AV) along concept | concept words in AV | concept words in text | generation | AV explanation of the steered state |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['scale']:g} | {cell(r['state_concept'])} | {cell(r['explanation_concept'])} | "
                     f"{cell(r['explanation_word_overlap'])} | {cell(r['generation_word_overlap'])} | "
                     f"{cell(r['generation'])} | {cell(r['av_explanation'])} |")
    return "\n".join(lines)


def cmd_steer(args: argparse.Namespace) -> int:
    from nla.bundle import NLA

    scales = parse_scales(args.scale)
    from nla.config import check_device

    check_device(args.device, "--device")  # a missing GPU is one line here, not a CUDA traceback
    nla = NLA.from_pretrained(args.nla, device=args.device)
    result = steer(nla, args.concept, args.prompt, scales, max_new_tokens=args.max_new_tokens, chat=args.chat,
                   verbalize=not args.no_verbalize, av_new_tokens=args.av_new_tokens)
    if args.json:
        import json

        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(dose_response_table(result))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "steer",
        help="generate with the AR's direction for a concept added at layer K; a dose–response table",
        description="Adds a·‖h‖·u at the output of decoder block K (= hidden_states[K+1]) for every position but "
        "the first, u the unit vector of AR(CONCEPT) minus the training mean, for each scale a; prints the "
        "generations and the AV's explanation of each steered state (does the concept appear?).",
    )
    p.add_argument("concept", help="the concept, in words (as an explanation would say it)")
    p.add_argument("--nla", required=True, help="NLA bundle folder")
    p.add_argument("--prompt", required=True, help="text the base model continues")
    p.add_argument("--scale", default=DEFAULT_SCALES, help="comma-separated steps, in units of each position's norm "
                   f"(default {DEFAULT_SCALES}; 0 is the unsteered baseline)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per scale")
    p.add_argument("--av-new-tokens", type=int, default=48, help="AV generation budget for the steered states")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message with the chat template")
    p.add_argument("--no-verbalize", action="store_true", help="skip the AV check (generations only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_flag(p)
    p.set_defaults(func=cmd_steer)
