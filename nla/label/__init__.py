"""Teacher labeling (`nla label`): providers, the prompt and its parser, the cache, the runner."""

from nla.label.prompt import (
    PROMPT_VERSION,
    build_messages,
    explanation_features,
    format_explanation,
    normalize_answer,
    parse_analysis,
)
from nla.label.providers import LabelRequest, Teacher
from nla.label.teachers import make_teacher

__all__ = [
    "PROMPT_VERSION",
    "LabelRequest",
    "Teacher",
    "build_messages",
    "explanation_features",
    "format_explanation",
    "make_teacher",
    "normalize_answer",
    "parse_analysis",
]
