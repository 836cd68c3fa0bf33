"""Input and output: JSONL / CSV / plain text, `-` for stdin, streaming writers, --resume."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TextIO

from llmlab.errors import DataError, UsageError

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


@dataclass
class Item:
    """One input: its position among the inputs, its fields, and where it came from."""

    index: int
    fields: dict[str, Any]
    source: str  # "data.jsonl line 3", for error messages

    @property
    def key(self) -> str:
        """Identity for --resume and duplicate checks: the `id` field, else the position."""
        if "id" in self.fields and self.fields["id"] not in (None, ""):
            return f"id:{self.fields['id']}"
        return f"index:{self.index}"


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
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
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
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append(Item(len(items), {text_field: line}, f"{name} line {n}"))
    if not items:
        raise DataError(f"{name} holds no inputs; give at least one line")
    return items


def _read_jsonl(text: str, name: str) -> list[Item]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
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
        items = []
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
    for item in items:
        if field not in item.fields:
            known = ", ".join(item.fields) or "none"
            raise DataError(
                f"{item.source}: no field '{field}' (fields: {known}); choose one with {option}"
            )


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


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


class Writer:
    """Writes one record at a time and flushes it, so an interrupted run keeps every finished row."""

    def __init__(self, stream: TextIO, fmt: str, text_key: str = "completion", append: bool = False):
        self.stream = stream
        self.fmt = fmt
        self.text_key = text_key
        self._csv: csv.DictWriter | None = None
        self._append = append
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            if self._csv is None:
                self._csv = csv.DictWriter(self.stream, fieldnames=list(record), extrasaction="ignore")
                if not self._append:
                    self._csv.writeheader()
            self._csv.writerow({k: _cell(v) for k, v in record.items()})
        else:
            value = record.get(self.text_key, "")
            self.stream.write((value if isinstance(value, str) else json.dumps(value)) + "\n")
        self.stream.flush()
        self.count += 1


class Output:
    """Context manager for stdout or a file; with resume, appends to what is already there."""

    def __init__(self, path: str | None, fmt: str = "auto", resume: bool = False, text_key: str = "completion"):
        self.path = None if path in (None, "-") else path
        self.fmt = output_format(path, fmt)
        self.resume = resume
        self.text_key = text_key
        self.done: set[str] = set()
        self._file: TextIO | None = None
        if resume:
            if self.path is None:
                raise UsageError("--resume needs --output FILE: it skips inputs already in that file")
            if self.fmt == "text":
                raise UsageError("--resume needs a .jsonl or .csv output: plain text keeps no ids")
            self.done = _finished_keys(self.path, self.fmt)

    def __enter__(self) -> Writer:
        append = bool(self.resume and self.path and os.path.exists(self.path) and self.done)
        if self.path:
            parent = Path(self.path).parent
            if not parent.exists():
                raise DataError(f"output folder '{parent}' does not exist")
            self._file = open(self.path, "a" if append else "w", encoding="utf-8", newline="")
            stream = self._file
        else:
            stream = sys.stdout
        return Writer(stream, self.fmt, self.text_key, append=append)

    def __exit__(self, *exc: object) -> None:
        if self._file:
            self._file.close()


def record_key(record: dict[str, Any]) -> str:
    if record.get("id") not in (None, ""):
        return f"id:{record['id']}"
    return f"index:{record.get('index')}"


def _finished_keys(path: str, fmt: str) -> set[str]:
    """Keys of the records already in an output file; drops a torn last line left by a crash."""
    if not os.path.exists(path):
        return set()
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        # A run killed mid-write leaves a partial last line: cut it so it is redone cleanly.
        data = data[: data.rfind(b"\n") + 1]
        Path(path).write_bytes(data)
    text = data.decode("utf-8", errors="replace")
    keys = set()
    if fmt == "csv":
        for row in csv.DictReader(io.StringIO(text, newline="")):
            if row.get("index", "") != "":
                row["index"] = int(row["index"])
            keys.add(record_key(row))
        return keys
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            keys.add(record_key(json.loads(line)))
        except (json.JSONDecodeError, AttributeError):
            raise DataError(
                f"{path} line {n}: not a JSON record; --resume needs an output file written by llmlab"
            ) from None
    return keys
