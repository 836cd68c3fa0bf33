"""Input and output: JSONL / CSV / plain text, `-` for stdin, streaming writers, --resume."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Iterable, Mapping, Sequence

from llmlab.core import console
from llmlab.core.errors import DataError, Interrupted, UsageError
from llmlab.core.jsontypes import JSONObject
from llmlab.io.items import Item, lines  # noqa: F401 - Item and lines re-exported
from llmlab.io.locks import SIGTERM_EXIT, OutputLock, SigtermAsExit
from llmlab.io.safewrite import TextSink, Writer, write_error
from llmlab.io.resume import (  # noqa: F401 - record_key re-exported
    check_same_input, check_same_settings, finished_records, record_key, settings_of, write_settings)

# this module's public names, and record_key (from llmlab.io.resume) that callers import from here
__all__ = [
    "INPUT_FORMATS", "Item", "OUTPUT_FORMATS", "Output", "Writer", "check_output_path", "check_unique_ids",
    "detect_format", "lines", "output_format", "read_items", "read_text", "record_key", "require_field",
    "require_text", "settings_of",
]

INPUT_FORMATS = ("auto", "jsonl", "csv", "tsv", "text")
OUTPUT_FORMATS = ("auto", "jsonl", "csv", "text")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
}


def _name(path: str) -> str:
    return "stdin" if path == "-" else path


def read_text(path: str) -> str:
    """The whole text of a file or stdin, with errors for missing files and non-UTF-8 bytes."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"input file '{path}' not found") from None
    except IsADirectoryError:
        raise DataError(f"input '{path}' is a directory, not a file") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror}") from None
    if isinstance(data, str):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{_name(path)} line {line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def detect_format(path: str, text: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    first = next((line.strip() for line in lines(text) if line.strip()), "")
    return "jsonl" if first.startswith("{") else "text"


def read_items(path: str, fmt: str = "auto", text_field: str = "prompt") -> list[Item]:
    """Read every input up front, so a malformed file fails before any output is written.

    Plain text gives one item per non-empty line, stored under `text_field`.
    """
    if fmt not in INPUT_FORMATS:
        raise UsageError(f"invalid --input-format '{fmt}': choose one of {', '.join(INPUT_FORMATS)}")
    text = read_text(path)
    fmt = detect_format(path, text, fmt)
    name = _name(path)
    if fmt == "jsonl":
        items = _read_jsonl(text, name)
    elif fmt in ("csv", "tsv"):
        items = _read_csv(text, name, "\t" if fmt == "tsv" else ",")
    else:
        items = []
        for n, line in enumerate(lines(text), 1):
            if line.strip():
                items.append(Item(len(items), {text_field: line}, f"{name} line {n}"))
    if not items:
        raise DataError(f"{name} holds no inputs; give at least one line")
    return items


def _read_jsonl(text: str, name: str) -> list[Item]:
    items: list[Item] = []
    for n, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} line {n}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"{name} line {n}: expected a JSON object like {{\"prompt\": \"...\"}}, "
                f"got {type(value).__name__}"
            )
        items.append(Item(len(items), value, f"{name} line {n}"))
    return items


def _read_csv(text: str, name: str, delimiter: str) -> list[Item]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        if any(not h for h in header) or len(set(header)) != len(header):
            raise DataError(
                f"{name} line 1: the header needs unique, non-empty column names (got {header})"
            )
        items: list[Item] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(
                    f"{name} line {line}: {len(row)} columns but the header has {len(header)}; "
                    "quote cells that contain the delimiter"
                )
            items.append(Item(len(items), dict(zip(header, row)), f"{name} line {line}"))
    except csv.Error as exc:
        raise DataError(f"{name} line {reader.line_num}: malformed CSV ({exc})") from None
    return items


def require_field(items: Iterable[Item], field: str, option: str = "--field") -> None:
    """Every item has `field`, and it holds text (see require_text)."""
    items = list(items)
    for item in items:
        if field not in item.fields:
            known = ", ".join(item.fields) or "none"
            raise DataError(
                f"{item.source}: no field '{field}' (fields: {known}); choose one with {option}"
            )
    require_text(items, [field])


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"the number {value}"
    names: dict[type, str] = {list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def require_text(items: Iterable[Item], fields: Sequence[str]) -> None:
    """Every item's `fields` (those it has) must hold text, checked before any model time.

    null, true/false, lists, objects and NaN/Infinity are errors naming the line and the field (null
    is never turned into the text "None"). A finite number is used as its JSON text (42 -> "42",
    2.5 -> "2.5"), with one warning per call naming the first such value and how many there are.
    """
    numbers: list[tuple[Item, str]] = []
    for item in items:
        for name in fields:
            value = item.fields.get(name, "")
            if isinstance(value, str):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                numbers.append((item, name))
                continue
            raise DataError(f"{item.source}: field '{name}' is {_kind(value)}, not text; "
                            f"give it a string (e.g. \"{name}\": \"...\") or drop the line")
    if numbers:
        item, name = numbers[0]
        text = json.dumps(item.fields[name])
        more = f" ({len(numbers)} numbers in all are used as text)" if len(numbers) > 1 else ""
        logging.getLogger("llmlab").warning(f"{item.source}: field '{name}' is the number {text}, not text; using the text "
                     f"'{text}'{more}")


def check_unique_ids(items: list[Item]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.key.startswith("id:"):
            if item.key in seen:
                raise DataError(
                    f"{item.source}: duplicate id {item.fields['id']!r} (first at {seen[item.key]}); "
                    "ids must be unique"
                )
            seen[item.key] = item.source


# ---------------------------------------------------------------- output


def output_format(path: str | None, fmt: str) -> str:
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"invalid --format '{fmt}': choose one of {', '.join(OUTPUT_FORMATS)}")
    if fmt != "auto":
        return fmt
    if path and path != "-":
        suffix = Path(path).suffix.lower()
        if suffix in (".csv", ".tsv", ".txt", ".jsonl", ".ndjson", ".json"):
            return {"tsv": "csv"}.get(_EXTENSIONS[suffix], _EXTENSIONS[suffix])
    return "jsonl"


class Output:
    """Context manager for stdout or a file; with resume, appends to what is already there.

    A file output is checked (folder exists and is writable, not a directory) and locked against a
    second llmlab writer as soon as this is built, before any model time. While it lives, SIGTERM
    stops the run like Ctrl-C: every finished record stays in the file; the exit status is 143
    (130 for Ctrl-C). `close()` (or leaving the `with` block) drops the lock.
    """

    def __init__(self, path: str | None, fmt: str = "auto", resume: bool = False, text_key: str = "completion",
                 settings: Mapping[str, object] | None = None):
        self.path = None if path in (None, "-") else path
        self.settings = settings  # kept beside a file output; --resume refuses other ones
        self.fmt = output_format(path, fmt)
        self.resume = resume
        self.text_key = text_key
        self.done: set[str] = set()
        # key -> (line, record) of each record already in the file (with resume)
        self.records: dict[str, tuple[int, JSONObject]] = {}
        self._file: io.FileIO | None = None  # the output file, unbuffered binary
        self._lock: OutputLock | None = None
        self._sigterm = SigtermAsExit()
        if resume:
            if self.path is None:
                raise UsageError("--resume needs --output FILE: it skips inputs already in that file")
            if self.fmt == "text":
                raise UsageError("--resume needs a .jsonl or .csv output: plain text keeps no ids")
        if self.path:
            check_output_path(self.path)
        if self.path and (not os.path.exists(self.path) or os.path.isfile(self.path)):  # not /dev/stdout, a FIFO
            self._lock = OutputLock(self.path)
            self._lock.acquire()  # before reading what is done: two resumed runs must not both do the rest
        try:
            self._sigterm.install()
            if resume and self.path is not None:  # checked above: resume needs a path
                self.records = finished_records(self.path, self.fmt)
                self.done = set(self.records)
                if self.records and self.settings is not None and self._lock is not None:
                    check_same_settings(self.path, self.settings)
        except BaseException:
            self.close()
            raise

    def pending(self, items: Sequence[Item]) -> list[Item]:
        """The items not yet in the output. With --resume, first checks that the records there were
        written from these inputs (same keys, same input fields): two runs are never mixed."""
        if self.records:
            check_same_input(self.path or "", self.fmt, self.records, items)
        self._total = len(items)
        return [it for it in items if it.key not in self.done]

    def __enter__(self) -> Writer:
        append = bool(self.resume and self.path and os.path.exists(self.path) and self.done)
        stream: TextSink | io.FileIO  # the file (unbuffered binary: llmlab.io.safewrite.Writer) or stdout
        if self.path:
            try:
                self._file = open(self.path, "ab" if append else "wb", buffering=0)  # unbuffered: see Writer
            except OSError as exc:
                raise write_error(self.path, exc, len(self.done)) from None
            if self._lock is not None:
                try:
                    self._lock.hold_file()  # a file made just now: lock its inode too
                    if self.settings is not None:
                        write_settings(self.path, self.settings)
                except OSError as exc:
                    self.close()
                    raise write_error(self.path, exc, len(self.done)) from None
                except BaseException:
                    self.close()
                    raise
            stream = self._file
        else:
            stream = console.data_stream()  # above a progress bar on the same terminal, never glued to it
        return Writer(stream, self.fmt, self.text_key, append, self.path or "stdout", len(self.done) if append else 0)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == SIGTERM_EXIT)
        if stopped and self.path and getattr(self, "_total", None):
            try:  # what is on disk now, whole records only
                written = len(finished_records(self.path, self.fmt))
            except Exception:  # noqa: BLE001 - the message must not hide the interruption
                written = len(self.done)
            raise Interrupted(f"interrupted: {written} of {self._total} written to {self.path}; rerun the same "
                              "command with --resume to finish", 130 if isinstance(exc, KeyboardInterrupt) else SIGTERM_EXIT
                              ) from exc

    def close(self) -> None:
        """Close the file, drop the lock, give SIGTERM back its previous handler."""
        if file := getattr(self, "_file", None):
            file.close()
            self._file = None
        if lock := getattr(self, "_lock", None):
            lock.release()
            self._lock = None
        if getattr(self, "_sigterm", None):
            self._sigterm.restore()

    def __del__(self) -> None:  # an Output never entered (nothing to do, an error) still unlocks
        self.close()


def check_output_path(path: str | None, option: str = "--output", inputs: Sequence[str | None] = ()) -> None:
    """Fail before any model time when results could not be written to `path`: a folder, a missing
    or unwritable folder (the lock file goes beside the output, so the folder must be writable), an
    unwritable file, or the very file being read (writing would truncate the input)."""
    if path in (None, "-"):
        return
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{option} '{path}' is a directory; give a file name inside it, e.g. {target / 'out.jsonl'}")
    parent = target.parent
    if not parent.is_dir():
        raise DataError(f"{option} '{path}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{option} '{path}': folder '{parent}' is not writable; choose another folder")
    if target.exists() and not os.access(target, os.W_OK):
        raise DataError(f"{option} '{path}' is not writable; choose another file or fix its permissions")
    for source in inputs:
        if source not in (None, "-") and target.exists() and Path(source).exists() \
                and os.path.samefile(source, target):
            raise DataError(f"{option} '{path}' is the input file itself; writing there would destroy the input: "
                            "choose another file")
