"""The two primitives every command is built on: `generate` and `loglikelihood` (the LM class).
Model loading lives in llmlab.backends.loading; its public names are re-exported here."""

from __future__ import annotations

from llmlab.backends.loading import (  # noqa: F401 - re-exported: llmlab.backends.models.load etc. keep working
    ALIASES,
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    ModelRef,
    auto_dtype,
    cache_root,
    cached_models,
    check_cache_writable,
    embedded_gguf,
    gguf_cache_dir,
    load,
    load_tokenizer,
    prepare_gguf,
    resolve_device,
    resolve_dtype,
    resolve_model,
)


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

__all__ = [  # the names this facade re-exports (callers import them from here)
    "ALIASES",
    "DEFAULT_MODEL",
    "DEVICES",
    "DTYPES",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "ModelRef",
    "auto_dtype",
    "cache_root",
    "cached_models",
    "check_cache_writable",
    "embedded_gguf",
    "gguf_cache_dir",
    "load",
    "load_tokenizer",
    "prepare_gguf",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "ModelInterface",
    "GenOutput",
    "GenRequest",
    "HoldBack",
    "LLOutput",
    "LLRequest",
    "cut_at_stop",
    "LM",
    "context_window",
]
