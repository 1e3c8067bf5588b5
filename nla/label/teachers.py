"""Which teacher a ``--teacher`` spec names: the one factory over every provider.

It sits above both :mod:`nla.label.providers` (the API and local teachers) and
:mod:`nla.label.lens` (the offline teacher, itself a providers ``Teacher``), so neither imports
the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nla.errors import NLAError
from nla.label.lens import LensTeacher
from nla.label.providers import AnthropicTeacher, HFTeacher, OpenAITeacher, Teacher


@dataclass
class TeacherSettings:
    """What :func:`make_teacher` needs from the label config."""

    base_url: str | None = None
    api_key_env: str | None = None
    timeout: float = 60.0
    max_tokens: int = 400
    temperature: float = 0.7
    concurrency: int = 32
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


PROVIDERS = ("lens", "lens-long", "openai", "anthropic", "hf")


def make_teacher(spec: str, s: TeacherSettings) -> Teacher:
    """Build a teacher from a ``--teacher`` spec."""
    provider, _, model = spec.partition(":")
    provider = provider.strip().lower()
    if provider in ("lens", "lens-long"):
        base = model or s.base_model
        if not base or base == "unknown":
            raise NLAError(f"--teacher {provider}: the dataset sidecar names no base model; use {provider}:MODEL")
        return LensTeacher(base, device=s.device, dtype=s.dtype, batch_size=s.batch_size,
                           style="short" if provider == "lens" else "long")
    if provider in ("openai", "anthropic"):
        cls = OpenAITeacher if provider == "openai" else AnthropicTeacher
        return cls(model, base_url=s.base_url, api_key_env=s.api_key_env, timeout=s.timeout,
                   max_tokens=s.max_tokens, temperature=s.temperature, concurrency=s.concurrency)
    if provider == "hf":
        return HFTeacher(model, device=s.device, dtype=s.dtype, batch_size=s.batch_size,
                         max_tokens=s.max_tokens, temperature=s.temperature)
    raise NLAError(f"--teacher {spec!r}: unknown provider {provider!r} (choose {', '.join(PROVIDERS)})")
