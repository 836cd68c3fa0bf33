"""Writing files so that a full disk (or any write error) never tears or destroys one.

- write_error(): the one-line error for a failed write, naming the file and the fix.
- replacing(): a whole file (a report, an export) written to a temporary file beside it and renamed
  over it only once complete, so the previous good file survives a failed write. A path that exists
  and is not a regular file (/dev/stdout, /dev/full, a FIFO) is written in place: never renamed over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator, TextIO

from llmlab.core.errors import DataError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(path: str, exc: OSError, kept: int | None = None) -> DataError:
    """The error for a failed write to `path`. kept: records left whole in it (record outputs, which
    --resume continues); None for a file written whole (the previous version is untouched)."""
    what = "disk full" if exc.errno in _FULL else f"write error ({exc.strerror or exc})"
    if kept is not None:
        return DataError(f"{what} while writing {path}: {kept} record{'s' if kept != 1 else ''} kept; "
                         "free space and rerun with --resume")
    return DataError(f"{what} while writing {path}: nothing was changed there; free space and rerun")


def _regular_or_missing(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def replacing(path: str) -> Iterator[TextIO]:
    """A text stream whose content replaces `path` when the block ends without an error; on an
    error (a full disk, Ctrl-C) the temporary file goes and `path` keeps what it held."""
    target = Path(path)
    if not _regular_or_missing(target):  # a device or pipe: written in place, never replaced
        try:
            with open(target, "w", encoding="utf-8", newline="") as out:
                yield out
        except OSError as exc:
            raise write_error(path, exc) from None
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            yield out
        if target.exists():  # keep the old file's permissions, not mkstemp's 0600
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text(path: str, text: str) -> None:
    """`text` as the whole of `path`, written through replacing()."""
    with replacing(path) as out:
        out.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
