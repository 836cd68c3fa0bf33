"""One road to a loaded model: a backend's name -> its loader. Every command that needs a model opens
it here (through orchestration.session.Session), so --backend, --device-map, --max-memory and the
backend's events mean the same in all of them."""

from __future__ import annotations

from typing import Callable

from llmlab.backends.base import LM, EventSink
from llmlab.core.config import ModelConfig
from llmlab.core.errors import UsageError


def _hf(cfg: ModelConfig) -> LM:
    from llmlab.backends import models

    return models.load(cfg.spec, cfg.device, cfg.dtype, device_map=cfg.device_map, max_memory=cfg.max_memory)


def _vllm(cfg: ModelConfig) -> LM:
    from llmlab.backends import vllm

    return vllm.load(cfg.spec, cfg.dtype, cfg.tensor_parallel_size)


# name -> loader(ModelConfig) -> LM. A new backend: a subclass of backends.base.LM and a line here.
BACKENDS: dict[str, Callable[[ModelConfig], LM]] = {"hf": _hf, "vllm": _vllm}


def open_backend(cfg: ModelConfig, on_event: EventSink | None = None) -> LM:
    """The model `cfg` names, loaded by its backend. on_event(level, message): where the backend's
    own messages go (out-of-memory back-off, unreachable stop texts); the logger when None."""
    loader = BACKENDS.get(cfg.backend)
    if loader is None:
        raise UsageError(f"invalid --backend '{cfg.backend}': choose {', '.join(BACKENDS)}")
    lm = loader(cfg)
    if on_event is not None:
        lm.on_event = on_event
    return lm
