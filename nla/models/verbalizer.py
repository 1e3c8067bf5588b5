"""The activation verbalizer (AV): vector in, explanation out (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nla.models.injection import Injector, MarkerTokens, check_vectors
from nla.models.prompts import (
    completion_suffix,
    encode_rendered,
    end_token_ids,
    format_response,
    parse_explanation,
    render_chat,
    user_content,
)


@dataclass
class InjectionSettings:
    mode: str = "replace"
    scale: float = 1.0
    layer: int = 1
    coef: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scale": self.scale, "layer": self.layer, "coef": self.coef}


@dataclass
class Verbalization:
    """One sampled answer: the parsed explanation (None if unparseable) and the raw text."""

    explanation: str | None
    raw: str
    truncated: bool = False
    token_ids: list[int] = field(default_factory=list)


class Verbalizer:
    """Builds the AV prompt, injects vectors at the marker and generates explanations."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tokens: MarkerTokens,
        template: str,
        injection: InjectionSettings,
        d_model: int,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.template = template
        self.injection = injection
        self.d_model = d_model
        self.end_ids = end_token_ids(tokenizer)
        self._prompt_cache: dict[str | None, list[int]] = {}
        self._opens_tag: bool | None = None

    # ---------------------------------------------------------------- prompts
    def prompt_text(self, tag: str | None = None) -> str:
        return render_chat(self.tokenizer, user_content(self.template, self.tokens.marker, tag))

    def prompt_ids(self, tag: str | None = None) -> list[int]:
        if tag not in self._prompt_cache:
            self._prompt_cache[tag] = encode_rendered(self.tokenizer, self.prompt_text(tag))
        return self._prompt_cache[tag]

    def training_example(self, explanation: str, tag: str | None = None) -> tuple[list[int], int]:
        """``(input_ids, n_prompt_tokens)`` for SFT: the loss covers only ids after the prompt."""
        prompt = self.prompt_ids(tag)
        content = user_content(self.template, self.tokens.marker, tag)
        suffix = completion_suffix(self.tokenizer, content, format_response(explanation))
        answer = self.tokenizer.encode(suffix, add_special_tokens=False)
        return prompt + list(answer), len(prompt)

    def injector(self, vectors: torch.Tensor | None = None) -> Injector:
        inj = self.injection
        return Injector(
            self.model, self.tokens, vectors, mode=inj.mode, scale=inj.scale, inject_layer=inj.layer, coef=inj.coef
        )

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        vectors: torch.Tensor,
        *,
        n: int = 1,
        max_new_tokens: int = 96,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 32,
        tags: list[str | None] | None = None,
        seed: int | None = None,
    ) -> list[list[Verbalization]]:
        """``n`` answers per vector; batches of up to ``batch_size`` sequences share a forward."""
        vectors = torch.as_tensor(vectors).float()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        check_vectors(vectors, self.d_model)
        if seed is not None:
            torch.manual_seed(seed)
        tags = tags or [None] * len(vectors)
        jobs = [(i, tags[i]) for i in range(len(vectors)) for _ in range(n)]
        results: list[list[Verbalization]] = [[] for _ in range(len(vectors))]
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_ids[0]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            prompts = [self.prompt_ids(tag) for _, tag in chunk]
            width = max(len(p) for p in prompts)
            # Left padding: every row's answer starts at the same column.
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            vecs = vectors[[i for i, _ in chunk]]
            gen_kwargs: dict[str, Any] = dict(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=self.end_ids,
                pad_token_id=pad_id,
            )
            if do_sample:
                gen_kwargs.update(temperature=temperature, top_p=top_p)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            with self.injector(vecs):
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            for r, (i, _) in enumerate(chunk):
                results[i].append(self._decode(out[r, width:].tolist()))
        return results

    def _decode(self, token_ids: list[int]) -> Verbalization:
        cut = len(token_ids)
        for k, t in enumerate(token_ids):
            if t in self.end_ids:
                cut = k
                break
        truncated = cut == len(token_ids)
        kept = token_ids[:cut]
        raw = self.tokenizer.decode(kept, skip_special_tokens=True)
        # Some published AV prompts end with the opening tag (anicka's end in "<explanation>"):
        # the model then writes only the text and the closing tag.
        if self._opens_tag is None:
            self._opens_tag = self.prompt_text().rstrip().endswith("<explanation>")
        explanation = parse_explanation("<explanation>" + raw if self._opens_tag else raw)
        return Verbalization(explanation, raw, truncated and explanation is None, kept)
