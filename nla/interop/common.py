"""Helpers every importer shares: scales, template placeholders, value heads, safe loading.

Importers read *other people's* folders, so everything here is defensive: a value that is
missing or contradicts another fails naming the field, and nothing in the folder is ever
executed (no ``trust_remote_code``, no pickle outside ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml

SQRT_D_NAMES = ("sqrt_d_model", "sqrt_d", "sqrt(d)", "sqrt(d_model)")
# A chat template that renders the user text as is (no turn markers): for AVs trained on a raw
# prompt (Solshine, anicka). The verbalizer tokenizes rendered text without special tokens and
# adds BOS exactly when the tokenizer itself would (nla.models.prompts.encode_rendered), which is
# what their ``tokenizer.encode(prompt)`` (add_special_tokens=True) does.
RAW_CHAT_TEMPLATE = (
    "{{ messages[0]['content'] }}"
    "{% for message in messages[1:] %}{{ message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}{% endfor %}"
)
# Our token field names → the paper's spellings (used by every publisher that copied its schema),
# so an error names the field as the user's own file spells it.
PAPER_TOKEN_FIELDS = {"tokens.marker_id": "tokens.injection_token_id", "tokens.left_id": "tokens.injection_left_neighbor_id",
                      "tokens.right_id": "tokens.injection_right_neighbor_id"}
HEAD_FILES = ("value_head.safetensors", "value_head.pt", "value_head.pth", "linear_head.safetensors", "linear_head.pt")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sidecar(root: Path) -> dict[str, Any]:
    path = root / META_NAME
    if not path.exists():
        raise NLAError(f"{root}: no {META_NAME} (not a folder of a known NLA layout)")
    return read_yaml(path)


def resolve_scale(value: Any, d_model: int, where: str | Path, field: str) -> float:
    """A number, or ``"sqrt_d_model"`` (the paper's spelling) meaning √d."""
    if isinstance(value, bool):
        raise NLAError(f"{where}: field {field!r} has invalid value {value!r}")
    if isinstance(value, (int, float)):
        scale = float(value)
    elif isinstance(value, str) and value.strip().lower().replace(" ", "") in SQRT_D_NAMES:
        scale = math.sqrt(d_model)
    else:
        try:
            scale = float(value)
        except (TypeError, ValueError):
            raise NLAError(f"{where}: field {field!r} has invalid value {value!r} (a number or 'sqrt_d_model')") from None
    if not math.isfinite(scale) or scale <= 0:
        raise NLAError(f"{where}: field {field!r} must be a positive number, got {value!r}")
    return scale


def map_placeholders(template: str, mapping: dict[str, str], required: str, where: str | Path, field: str) -> str:
    """Turn a ``str.format`` template into our ``{marker}``/``{explanation}``/``{tag}`` form.

    ``mapping`` renames their placeholders to ours (e.g. ``injection_char`` → ``{marker}``);
    ``{{``/``}}`` escapes become literal braces, as ``str.format`` would render them. Any
    other placeholder is an error: silently leaving ``{question}`` in a prompt would feed the
    model text it was never trained on.
    """
    names = set()
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            if name is not None:
                names.add(name)
    except ValueError as exc:
        raise NLAError(f"{where}: field {field!r} is not a valid template ({first_line(exc)})") from None
    unknown = names - set(mapping)
    if unknown:
        raise NLAError(f"{where}: field {field!r} has unknown placeholder(s) {sorted(unknown)} "
                       f"(expected {sorted(mapping)})")
    if required not in {mapping[n] for n in names}:
        theirs = [k for k, v in mapping.items() if v == required]
        raise NLAError(f"{where}: field {field!r} has no {{{theirs[0]}}} placeholder")
    return template.format(**{k: "{" + v + "}" for k, v in mapping.items()})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or ``.pt`` file; ``.pt`` only through ``weights_only``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses pickled objects (code): report it, never fall back to full pickle.
        raise NLAError(f"{path}: cannot read tensors safely ({first_line(exc)})") from None
    if isinstance(obj, torch.Tensor):
        return {"weight": obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise NLAError(f"{path}: expected a tensor or a dict of tensors, found {type(obj).__name__}")


def find_head_file(folder: Path, name: str | None = None) -> Path:
    if name:
        path = folder / name
        if not path.exists():
            raise NLAError(f"{folder}: value head file {name!r} not found")
        return path
    for candidate in HEAD_FILES:
        if (folder / candidate).exists():
            return folder / candidate
    raise NLAError(f"{folder}: no value head file (looked for {', '.join(HEAD_FILES)})")


def load_linear(path: Path, d_in: int, d_out: int) -> nn.Linear:
    """An fp32 ``Linear(d_in, d_out)`` (bias if the file has one) from ``weight``/``bias``.

    Keys may carry a prefix (``linear.weight``, ``head.bias``): exactly one of each is accepted,
    so an ambiguous file is an error instead of a coin flip.
    """
    return linear_from(_read_tensors(path), d_in, d_out, path)


def linear_from(tensors: dict[str, torch.Tensor], d_in: int, d_out: int, path: str | Path) -> nn.Linear:
    """:func:`load_linear` on tensors already read (``path`` names them in errors)."""
    weights = [k for k in tensors if k == "weight" or k.endswith(".weight")]
    biases = [k for k in tensors if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1:
        raise NLAError(f"{path}: expected exactly one 'weight' tensor, found {sorted(tensors)}")
    if len(biases) > 1:
        raise NLAError(f"{path}: more than one 'bias' tensor: {biases}")
    weight = tensors[weights[0]].float()
    if tuple(weight.shape) != (d_out, d_in):
        raise NLAError(f"{path}: 'weight' has shape {list(weight.shape)}, expected [{d_out}, {d_in}]")
    bias = tensors[biases[0]].float() if biases else None
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise NLAError(f"{path}: 'bias' has shape {list(bias.shape)}, expected [{d_out}]")
    layer = nn.Linear(d_in, d_out, bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer



def read_json(path: Path, what: str = "malformed JSON") -> Any:
    """A JSON file read as data; unreadable or malformed is one line naming the file."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NLAError(f"{path}: {what} ({first_line(exc)})") from None


def _config_int(folder: Path, names: tuple[str, ...], missing: str) -> int:
    """The first integer of ``names`` in a model folder's config.json, read as data (the text
    model's part for multimodal ones)."""
    path = folder / "config.json"
    if not path.exists():
        raise NLAError(f"{folder}: no config.json")
    cfg = read_json(path)
    cfg = cfg.get("text_config") or cfg
    for name in names:
        if isinstance(cfg.get(name), int):
            return int(cfg[name])
    raise NLAError(f"{path}: no {missing}")

def config_layers(folder: Path) -> int:
    """``num_hidden_layers`` from a model folder's config.json, read as data (no code)."""
    return _config_int(folder, ("num_hidden_layers", "n_layer", "num_layers"), "num_hidden_layers")


def config_width(folder: Path) -> int:
    """``hidden_size`` from a model folder's config.json (read as data)."""
    return _config_int(folder, ("hidden_size", "n_embd", "d_model"), "hidden_size")


def check_width(d_model: int, folders: list[Path], where: str | Path, field: str = "d_model") -> None:
    """The sidecar's width must be the models' width (a mismatch means the wrong pair)."""
    for folder in folders:
        width = config_width(folder)
        if width != d_model:
            raise NLAError(f"{where}: field {field!r} is {d_model} but {folder.name}/config.json has hidden_size {width}")


def check_equal(values: dict[str, Any], where: str | Path) -> Any:
    """The one value several fields agree on; fields that disagree are named."""
    present = {k: v for k, v in values.items() if v is not None}
    if not present:
        raise NLAError(f"{where}: missing field {' or '.join(repr(k) for k in values)}")
    distinct = set(present.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{k}={v!r}" for k, v in present.items())
        raise NLAError(f"{where}: contradictory fields: {listing}")
    return next(iter(distinct))


# ---------------------------------------------------------------- model loading
def quantization_4bit() -> Any:
    """A bitsandbytes 4-bit (NF4) config, or a clear error where it cannot work."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise NLAError("4-bit base loading needs the bitsandbytes package (pip install bitsandbytes) and a "
                       "CUDA GPU; load the base in full precision instead (load_in_4bit=False / --no-4bit)")
    if not torch.cuda.is_available():
        raise NLAError("4-bit base loading needs a CUDA GPU (bitsandbytes); none is available here. "
                       "Load the base in full precision instead (load_in_4bit=False / --no-4bit)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


def is_adapter_dir(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def adapter_base(folder: Path) -> str | None:
    """``base_model_name_or_path`` of a PEFT adapter folder (read as JSON data)."""
    cfg = read_json(folder / "adapter_config.json", "unreadable")
    base = cfg.get("base_model_name_or_path")
    return str(base) if base else None


def folder_tokenizer(folder: Path, base: str | None) -> Any:
    """The tokenizer a folder ships (``tokenizer_config.json``), else the base model's: an
    adapter folder often carries none, and its base's is the one it was trained with."""
    from nla.models.loading import load_tokenizer

    if (folder / "tokenizer_config.json").exists():
        return load_tokenizer(str(folder))
    if base is None:
        raise NLAError(f"{folder}: no tokenizer files and no base model named")
    return load_tokenizer(base)


def load_causal_lm(spec: str, dtype: torch.dtype, device: torch.device, quant: Any = None) -> Any:
    from nla.models.loading import load_model, resolve_model_path

    if quant is None:
        model, _ = load_model(spec, dtype=dtype, device=device)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), quantization_config=quant,
                                                dtype=torch.bfloat16, device_map={"": 0},
                                                trust_remote_code=False).eval()


def load_av(av_dir: Path, base: str | None, dtype: torch.dtype, device: torch.device, quant: Any = None) -> Any:
    """The AV: a full model folder, or a PEFT adapter over ``base``."""
    if not is_adapter_dir(av_dir):
        return load_causal_lm(str(av_dir), dtype, device)
    from peft import PeftModel

    if base is None:
        raise NLAError(f"{av_dir}: a LoRA adapter, but no base model is named")
    model = load_causal_lm(base, dtype, device, quant)
    return PeftModel.from_pretrained(model, str(av_dir), is_trainable=False).eval()


# ---------------------------------------------------------------- pairing and adapters
_ROLE_PART = re.compile(r"(?<=[-_])(av|ar)(?=$|[-_])")


def partner_candidates(path: Path, role: str) -> list[Path]:
    """Where the other half of ``path`` would be, by the names publishers use.

    ``nla-qwen2.5-7b-L20-av`` ↔ ``-ar``, ``…-av-v2`` ↔ ``…-ar-v2`` (anicka),
    ``…-L23-av-v0_0_1`` ↔ ``…-ar-v0_0_1`` (Solshine), ``x_av`` ↔ ``x_ar``, ``av/`` ↔ ``ar/``.
    """
    other = "ar" if role == "av" else "av"
    name = path.name
    out = []
    hits = [m for m in _ROLE_PART.finditer(name) if m.group(1) == role]
    if hits:
        m = hits[-1]
        out.append(path.with_name(name[: m.start()] + other + name[m.end():]))
    if name == role:
        out.append(path.with_name(other))
    return out


def find_partner(path: Path, role: str, accept: Callable[[Path], bool], what: str) -> Path:
    """The other half next to ``path`` (by name), or an error that says how to pass it."""
    other = "ar" if role == "av" else "av"
    for cand in partner_candidates(path, role):
        if cand.is_dir() and accept(cand):
            return cand
    flag = "--ar DIR (ar=...)" if other == "ar" else "the AV folder as SOURCE and this one as --ar"
    raise NLAError(f"{path}: the {role.upper()} half of a {what} pair and no {other.upper()} folder found next to it "
                   f"by name; pass {flag}, or put both as av/ and ar/ in one folder")


def pair_folders(path: Path, ar: Path | None, is_av: Callable[[Path], bool], is_ar: Callable[[Path], bool],
                 what: str, known_by: str = "av") -> tuple[Path, Path]:
    """``(av_dir, ar_dir)`` of a pair: ``ar`` given, a folder holding ``av/`` and ``ar/``, or one
    half with its sibling found by name. ``known_by`` says whose test (``is_av`` or ``is_ar``)
    decides which half a lone folder is, where a publisher's AV folder could pass the other."""
    if ar is not None:
        return path, ar
    if is_av(path / "av") and is_ar(path / "ar"):
        return path / "av", path / "ar"
    lone_ar = is_ar(path) if known_by == "ar" else not is_av(path)
    if lone_ar:
        return find_partner(path, "ar", is_av, what), path
    return path, find_partner(path, "av", is_ar, what)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Public name of the safe tensor reader (safetensors, or ``.pt`` weights-only)."""
    return _read_tensors(path)


def merge_lora(model: nn.Module, tensors: dict[str, torch.Tensor], scaling: float, where: Path,
               skip: Callable[[str], bool] = lambda name: False) -> int:
    """Fold LoRA pairs ``<module>.lora_A[.<adapter>].weight`` / ``lora_B`` into ``model``.

    Publishers save adapters from different wrappers (a causal LM under PEFT:
    ``base_model.model.model.layers.3.self_attn.q_proj``; nanoNLA's critic:
    ``backbone.model.layers.3…``); the module is found by the longest suffix of the key's
    path that names a module of ``model``. ``W += scaling * B @ A`` in fp32, exactly what
    PEFT's merge does. Keys under ``skip`` (blocks past the read-out, the LM head) are
    ignored; any other key that fits nowhere is an error naming the file, never a silent drop.
    Returns the number of merged modules.
    """
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    merged = 0
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise NLAError(f"{where}: LoRA weights for {path!r} have no matching lora_A/lora_B pair")
        parts = path.split(".")
        target = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in modules), None)
        if target is None:
            if skip(path):
                continue
            raise NLAError(f"{where}: LoRA weights for {path!r} match no module of the model")
        layer = modules[target]
        weight = getattr(layer, "weight", None)
        delta = ab["B"].float() @ ab["A"].float() * scaling
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(delta.shape):
            raise NLAError(f"{where}: LoRA weights for {path!r} have shape {list(delta.shape)}, the module "
                           f"{target!r} has {list(getattr(weight, 'shape', []))}")
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        merged += 1
    return merged


def block_index(path: str) -> int | None:
    """The decoder block a parameter path belongs to (``…layers.7.mlp…`` → 7), if any."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", path + ".")
    return int(m.group(1)) if m else None


def adapter_scaling(folder: Path) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) from a PEFT ``adapter_config.json``."""
    path = folder / "adapter_config.json"
    cfg = read_json(path, "unreadable")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise NLAError(f"{path}: fields 'r' and 'lora_alpha' must be numbers, got {r!r} and {alpha!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise NLAError(f"{path}: per-module 'rank_pattern'/'alpha_pattern' are not supported here")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).exists():
            return _read_tensors(folder / name)
    raise NLAError(f"{folder}: no adapter_model.safetensors")


def merged_trunk(spec: str, last_block: int, adapter: dict[str, torch.Tensor], scaling: float, where: Path,
                 dtype: torch.dtype, keep_final_norm: bool = False) -> nn.Module:
    """Blocks ``0..last_block`` of ``spec`` with a LoRA adapter folded in (a plain, full trunk).

    Used for ARs whose adapter was trained on a wrapper our trunk is not (a full causal LM
    read at an inner block, nanoNLA's critic module): merging by module path is exact and
    does not depend on the wrapper's key prefix.
    """
    from nla.models.loading import resolve_model_path
    from nla.models.reconstructor import load_trunk, truncated_config

    path = resolve_model_path(spec)
    if keep_final_norm:
        from transformers import AutoModel

        trunk = AutoModel.from_pretrained(path, config=truncated_config(path, last_block), dtype=dtype,
                                          trust_remote_code=False)
    else:
        trunk = load_trunk(path, last_block, dtype)

    def beyond(name: str) -> bool:
        idx = block_index(name)
        return (idx is not None and idx > last_block) or "lm_head" in name

    if merge_lora(trunk, adapter, scaling, where, beyond) == 0:
        raise NLAError(f"{where}: no LoRA weights found for blocks 0..{last_block}")
    return trunk
