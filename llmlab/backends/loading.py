"""Model loading: the tokenizer, the config and the weights, from any source (local folder, GGUF
cache, Hugging Face Hub, cache first), onto a device. Builds the LM that runs the model.
Where a model comes from: llmlab.backends.modelspec; device and dtype policy: llmlab.backends.devices (their public
names are re-exported here)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, TypeVar

from llmlab.backends import modelcache
from llmlab.backends.devices import (  # noqa: F401 - re-exported
    DEVICES, DTYPES, FP32_MAX_PARAMS, auto_dtype, count_parameters, map_device, resolve_device, resolve_dtype,
    weights_dtype)
from llmlab.core.errors import ModelError
from llmlab.backends.catalog import cached_models  # noqa: F401 - re-exported
from llmlab.backends.hfutil import model_class as _model_class, quiet_transformers as _quiet_transformers
from llmlab.backends.modelcache import cache_root, check_cache_writable  # noqa: F401 - re-exported
from llmlab.backends.modelspec import (  # noqa: F401 - re-exported
    ALIASES, DEFAULT_MODEL, SMOLLM2_FILE, SMOLLM2_PACKAGE, ModelRef, embedded_gguf, gguf_cache_dir, gguf_source,
    prepare_gguf, resolve_model)


if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase
    from llmlab.backends.hfutil import Model

    from llmlab.backends.base import Tokenizer
    from llmlab.backends.hf import HFLM

_Loaded = TypeVar("_Loaded")

# this module's public names and those it re-exports (callers import them from here)
__all__ = [
    "ALIASES", "DEFAULT_MODEL", "DEVICES", "DTYPES", "FP32_MAX_PARAMS", "SMOLLM2_FILE", "SMOLLM2_PACKAGE",
    "ModelRef", "auto_dtype", "cache_root", "cached_models", "check_cache_writable", "count_parameters",
    "embedded_gguf", "gguf_cache_dir", "gguf_source", "load", "load_tokenizer", "map_device",
    "placement_plan", "prepare_gguf", "resolve_device", "resolve_dtype", "resolve_model", "weights_dtype",
]


# ---------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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


def _hub_folder(ref: ModelRef) -> str | None:
    """The local snapshot of a hub model when the Hugging Face cache holds its config."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.location, "config.json")
    if not isinstance(found, str):
        found = try_to_load_from_cache(ref.location, "tokenizer_config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def _source(ref: ModelRef) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for from_pretrained."""
    if ref.kind == "gguf":
        return gguf_source(ref)
    if ref.kind == "hub":
        return _hub_folder(ref) or ref.location, None
    return ref.location, None


def _from_pretrained(ref: ModelRef, loader: Callable[..., _Loaded], **kwargs: object) -> _Loaded:
    """Call a from_pretrained for any source: local folder, GGUF cache, or hub (cache first)."""
    where, gguf_file = _source(ref)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif ref.kind == "gguf" and "config" in kwargs:  # the converted cache: its safetensors only, never a
        kwargs["use_safetensors"] = True  # pickled pytorch_model.bin planted beside it
    if ref.kind != "hub" or where != ref.location:
        try:
            return loader(where, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load '{where}': {_first_line(exc)}") from exc
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


def _fast_tokenizer(folder: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer class a saved folder names, loaded without AutoTokenizer (which imports torch):
    `prompt render` then never loads torch. None when the folder needs AutoTokenizer's logic."""
    path = Path(folder)
    try:
        settings = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = settings.get("tokenizer_class") if isinstance(settings, dict) else None
    if not isinstance(name, str) or not (path / "tokenizer.json").is_file():
        return None
    import transformers

    try:
        cls = getattr(transformers, name, None) or getattr(transformers, name + "Fast", None)
        if cls is None:
            return None
        tokenizer = cls.from_pretrained(folder)
        return tokenizer if isinstance(tokenizer, transformers.PreTrainedTokenizerBase) else None
    except (ImportError, AttributeError):  # a class that needs an optional package: AutoTokenizer decides
        return None


def _tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    """The tokenizer, read from a folder by the class it names when possible (see _fast_tokenizer)."""
    where, gguf_file = _source(ref)
    if not gguf_file and Path(where).is_dir():
        try:
            tokenizer = _fast_tokenizer(where)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer in '{where}': {_first_line(exc)}") from exc
        if tokenizer is not None:
            return _prepare_tokenizer(tokenizer)
    from transformers import AutoTokenizer

    return _prepare_tokenizer(_from_pretrained(ref, AutoTokenizer.from_pretrained))


_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_ENCODER_DECODER = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "led", "longt5", "switch_transformers")


def _config_facts(ref: ModelRef) -> PretrainedConfig | SimpleNamespace | None:
    """The model config's window and architecture facts, read from config.json when it states them
    (no AutoConfig, no torch); else the full AutoConfig. None for a tokenizer-only folder."""
    where, gguf_file = _source(ref)
    path = Path(where) / "config.json"
    if ref.kind == "local" and not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text()) if not gguf_file else None
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and "model_type" in raw:
        if any(k in raw for k in _WINDOW_KEYS) or raw["model_type"] in _ENCODER_DECODER:
            raw.setdefault("is_encoder_decoder", raw["model_type"] in _ENCODER_DECODER)
            return SimpleNamespace(**raw)
    _quiet_transformers()
    from transformers import AutoConfig

    return _from_pretrained(ref, AutoConfig.from_pretrained)


def load_tokenizer(spec: str | None) -> tuple[Tokenizer, int | None, bool]:
    """The model's tokenizer, context window and whether it is encoder-decoder, without any weights.
    A converted or saved model needs neither torch nor the model code for this."""
    from llmlab.backends.base import as_tokenizer
    from llmlab.backends.hf import context_window

    from llmlab.backends import adapters

    _quiet_transformers()
    ref = resolve_model(adapters.split(spec)[0])  # an adapter keeps its base's tokenizer
    if ref.kind == "gguf" and modelcache.entry_problem(gguf_cache_dir(ref)) is not None:
        # Read straight from the GGUF metadata rather than dequantizing the weights.
        from transformers import AutoConfig, AutoTokenizer

        modelcache.check_gguf(Path(ref.location) / (ref.gguf_file or ""))
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file))
        config: PretrainedConfig | SimpleNamespace | None = AutoConfig.from_pretrained(ref.location,
                                                                                      gguf_file=ref.gguf_file)
    else:
        tokenizer, config = _tokenizer(ref), _config_facts(ref)
    if config is not None:
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    else:  # a tokenizer folder alone: judge by the tokenizer's family
        encoder_decoder = re.search(r"T5|Bart|Pegasus", type(tokenizer).__name__) is not None
    return as_tokenizer(tokenizer), context_window(config, tokenizer), encoder_decoder


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batches need a pad token; models without one pad with end-of-text (masked out anyway)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(spec: str | None, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
         max_memory: dict | None = None, offload_folder: str | None = None) -> HFLM:
    """Load a model and its tokenizer onto a device. Architecture comes from the config.
    device_map (auto, balanced, balanced_low_0, sequential) and max_memory ({0: bytes, 'cpu':
    bytes}) spread it over devices with accelerate instead (see llmlab.backends.placement); layers that fit
    nowhere go to offload_folder on disk (a temporary folder when None)."""
    _quiet_transformers()
    from transformers import AutoConfig

    from llmlab.backends import adapters, placement

    base_spec, adapter = adapters.split(spec)
    record = adapters.read_record(adapter) if adapter else None  # a missing adapter: one line, no model time
    ref = resolve_model(base_spec)
    placement.check(device, device_map, max_memory)
    device_name = resolve_device(device) if device_map is None else map_device(max_memory)
    if (dtype or "auto").strip().lower() not in DTYPES:
        resolve_dtype(dtype, device_name)  # refuse a bad name before any model time
    started = time.perf_counter()
    if ref.kind == "local" and not (Path(ref.location) / "config.json").is_file():
        raise ModelError(f"'{ref.location}' holds a tokenizer but no model (no config.json); "
                         "it can render prompts but not run them")
    config = _from_pretrained(ref, AutoConfig.from_pretrained)
    if record is not None and adapter:  # (record is None without an adapter)
        adapters.check_base(record, config, ref.name, adapter)  # before the weights
    model_class = _model_class(config)
    torch_dtype = weights_dtype(dtype, device_name, model_class, config)
    try:
        model = _from_pretrained(ref, model_class.from_pretrained, config=config, dtype=torch_dtype,
                                 **_spread(device_map, max_memory, offload_folder))
    except ValueError as exc:  # e.g. an architecture transformers doesn't know for this class
        raise ModelError(f"cannot load '{ref.name}': {_first_line(exc)}") from exc
    tokenizer = _tokenizer(ref)
    if record is not None and adapter:
        model = adapters.attach(model, adapter, record)
    device_name, where = _place(model, device_name, device_map)
    model.eval()
    logging.getLogger("llmlab").info(
        f"loaded {ref.name} ({config.model_type}, {model_class.__name__.removeprefix('AutoModelFor')}) "
        f"on {where} as {str(torch_dtype).removeprefix('torch.')} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    name = f"{ref.name}+{adapter}" if adapter else ref.name
    return adapters.lm_class(record)(name, model, tokenizer, device_name)


def _spread(device_map: str | None, max_memory: dict | None, offload_folder: str | None) -> dict[str, object]:
    """from_pretrained's arguments for spreading a model with accelerate ({} for one device)."""
    if device_map is None:
        return {}
    import logging

    # accelerate's "parameters on the meta device" warning: load's info line says where they went
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder or _offload_folder()}


def _place(model: Model, device_name: str, device_map: str | None) -> tuple[str, str]:
    """Put a model on its device (unless accelerate placed it): (device for inputs, where it is, in words)."""
    from llmlab.backends import placement

    if device_map is None:
        model.to(device_name)  # type: ignore[arg-type]  # mypy reads transformers' @wraps(Module.to) as unbound
        return device_name, device_name
    # accelerate placed it (no hf_device_map when it all fit one device); inputs go to its main device
    placed = getattr(model, "hf_device_map", None) or {"": str(model.device)}
    where = ", ".join(sorted({placement.device_name(d) for d in placed.values()}))
    return placement.input_device(placed), where


def _offload_folder() -> str:
    """A temporary folder for disk-offloaded weights, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="llmlab-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def placement_plan(spec: str | None, dtype: str = "auto", device_map: str = "auto",
                   max_memory: dict | None = None) -> list[str]:
    """--dry-run: how `load(spec, dtype=dtype, device_map=..., max_memory=...)` would place the
    model, as lines of text; reads the config only (no weights)."""
    _quiet_transformers()
    from transformers import AutoConfig

    from llmlab.backends import adapters, placement

    ref = resolve_model(adapters.split(spec)[0])  # an adapter adds no weight worth placing
    placement.check("auto", device_map, max_memory)
    device_name = map_device(max_memory)
    config = _from_pretrained(ref, AutoConfig.from_pretrained)
    model_class = _model_class(config)
    torch_dtype = weights_dtype(dtype, device_name, model_class, config)
    shares = placement.plan(model_class, config, torch_dtype, device_map, max_memory)
    return placement.describe(ref.name, shares)
