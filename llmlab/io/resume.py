"""--resume: what an output file already holds, and the check that it was written from these inputs."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from llmlab.core.errors import DataError
from llmlab.io.items import Item, cell, lines


def record_key(record: dict[str, Any]) -> str:
    if record.get("id") not in (None, ""):
        return f"id:{record['id']}"
    return f"index:{record.get('index')}"


# Keys a record writer sets itself (generate, classify): not input fields to compare on --resume.
RECORD_KEYS = {
    "index", "completion", "completions", "prompt_tokens", "completion_tokens", "finish_reason", "model",
    "prediction", "correct", "probabilities", "raw_probabilities", "shots",
}


def _same_field(name: str, value: Any, record: dict[str, Any], fmt: str) -> bool:
    if name in RECORD_KEYS:
        return True
    if name not in record:
        return fmt == "csv"  # a CSV's columns come from its first record: later ones may lack a field
    stored = record[name]
    if fmt == "csv":
        value = "" if value is None else str(cell(value))
    if name == "prompt" and isinstance(stored, str):
        # a record's prompt is the text the model got: the field itself, or a template built around it
        return str(value) in stored
    return stored == value


def check_same_input(path: str, fmt: str, records: dict[str, tuple[int, dict[str, Any]]],
                      items: Sequence[Item]) -> None:
    by_key = {item.key: item for item in items}
    for key, (line, record) in records.items():
        item = by_key.get(key)
        if item is None:
            kind, _, value = key.partition(":")
            problem = f"its {kind} {value} is not among the inputs"
        else:
            field = next((f for f, v in item.fields.items() if not _same_field(f, v, record, fmt)), None)
            if field is None:
                continue
            problem = f"its '{field}' differs from {item.source}"
        raise DataError(f"--resume: {path} line {line} was written from a different input ({problem}); "
                        "write to a different --output, or drop --resume to start over")


def finished_records(path: str, fmt: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """The records already in an output file by key, with their line; drops a torn last line left by a crash."""
    if not os.path.exists(path):
        return {}
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        # A run killed mid-write leaves a partial last line: cut it so it is redone cleanly.
        data = data[: data.rfind(b"\n") + 1]
        Path(path).write_bytes(data)
    text = data.decode("utf-8", errors="replace")
    records: dict[str, tuple[int, dict[str, Any]]] = {}
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            if row.get("index", "") not in ("", None):
                try:
                    row["index"] = int(row["index"])
                except ValueError:
                    pass
            records[record_key(row)] = (reader.line_num, row)
        return records
    for n, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record_key(record)] = (n, record)
        except (json.JSONDecodeError, AttributeError):
            raise DataError(
                f"{path} line {n}: not a JSON record; --resume needs an output file written by llmlab"
            ) from None
    return records
