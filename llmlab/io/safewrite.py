"""Writing files so that a full disk (or any write error) never tears or destroys one.

- Writer: record outputs (generate/classify -o), one whole record per write, cut back on an error.

- write_error(): the one-line error for a failed write, naming the file and the fix.
- replacing(): a whole file (a report, an export) written to a temporary file beside it and renamed
  over it only once complete, so the previous good file survives a failed write. A path that exists
  and is not a regular file (/dev/stdout, /dev/full, a FIFO) is written in place: never renamed over.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, TextIO

from llmlab.core.errors import DataError
from llmlab.io.items import cell

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
def replacing(path: str, check: Callable[[str], None] | None = None) -> Iterator[TextIO]:
    """A text stream whose content replaces `path` when the block ends without an error; on an
    error (a full disk, Ctrl-C) the temporary file goes and `path` keeps what it held. check(tmp),
    if given, reads the written temporary file first: whatever it raises also keeps `path` as it was."""
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
        if check is not None:
            check(tmp)
        settle_mode(tmp, target)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def settle_mode(tmp: str, target: Path) -> None:
    """Give a temporary file about to replace `target` the old file's permissions, or a new file's
    (0666 less the umask), not mkstemp's private 0600."""
    if target.exists():
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
    else:
        os.chmod(tmp, 0o666 & ~_umask())


def write_text(path: str, text: str, check: Callable[[str], None] | None = None) -> None:
    """`text` as the whole of `path`, written through replacing() (check: see there)."""
    with replacing(path, check) as out:
        out.write(text)


class TextSink(Protocol):
    """Where records go when not to a file: stdout (llmlab.core.console.data_stream())."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Writer:
    """Writes one record at a time, each whole or not at all, so an interrupted run keeps every
    finished row. A file is written unbuffered, one write per record; when a write fails (a full
    disk) the file is cut back to its last whole record and the error names the file and the fix."""

    def __init__(self, stream: TextSink | io.RawIOBase, fmt: str, text_key: str = "completion", append: bool = False,
                 name: str = "", kept: int = 0):
        self.fmt = fmt
        self.text_key = text_key
        self._csv: csv.DictWriter | None = None
        self._buffer = io.StringIO()
        self._append = append
        self.count = 0
        self.name, self.kept = name, kept  # the file, and the records already in it (--resume)
        self._sink: TextSink | None = None if isinstance(stream, io.RawIOBase) else stream
        self._fd = stream.fileno() if isinstance(stream, io.RawIOBase) else None
        self._good = os.fstat(self._fd).st_size if self._fd is not None else 0  # bytes of whole records

    def _text(self, record: Mapping[str, object]) -> str:
        if self.fmt == "jsonl":
            return json.dumps(record, ensure_ascii=False) + "\n"
        if self.fmt == "csv":
            self._buffer.seek(0)
            self._buffer.truncate()
            if self._csv is None:
                self._csv = csv.DictWriter(self._buffer, fieldnames=list(record), extrasaction="ignore")
                if not self._append:
                    self._csv.writeheader()
            self._csv.writerow({k: cell(v) for k, v in record.items()})
            return self._buffer.getvalue()
        value = record.get(self.text_key, "")
        return (value if isinstance(value, str) else json.dumps(value)) + "\n"

    def write(self, record: Mapping[str, object]) -> None:
        text = self._text(record)
        if self._sink is not None:
            self._sink.write(text)
            self._sink.flush()
        elif self._fd is not None:
            data = memoryview(text.encode("utf-8"))
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, self._good)  # no torn record: back to the last whole one
                except OSError:
                    pass  # not a regular file (/dev/full): nothing to cut
                raise write_error(self.name, exc, self.kept + self.count) from None
            self._good += len(text.encode("utf-8"))
        self.count += 1
