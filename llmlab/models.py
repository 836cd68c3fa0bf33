"""The two primitives every command is built on: `generate` and `loglikelihood` (the LM class).
Model loading lives in llmlab.loading; its public names are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llmlab import console
from llmlab.errors import UsageError
from llmlab.loading import (  # noqa: F401 - re-exported: llmlab.models.load etc. keep working
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

# Window sizes above this are tokenizer sentinels ("no limit known"), not real windows.
_ABSURD_WINDOW = 1_000_000
# generate sorts prompts by length within windows of this many batches (results keep input order).
_GEN_WINDOW_BATCHES = 8
# Shared prefixes shorter than this are not worth a KV cache of their own.
_MIN_PREFIX = 8
# T5 uses relative positions, so its config has no window; FLAN-T5 was trained on 512 tokens.
_T5_WINDOW = 512


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
