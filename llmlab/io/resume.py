"""--resume: what an output file already holds, and the check that it was written from these inputs."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from llmlab.core.errors import DataError, UsageError
from llmlab.core.jsontypes import JSONObject, JSONValue
from llmlab.io.items import Item, cell, lines


def record_key(record: Mapping[str, object]) -> str:
    if record.get("id") not in (None, ""):
        return f"id:{record['id']}"
    return f"index:{record.get('index')}"


# Keys a record writer sets itself (generate, classify): not input fields to compare on --resume.
RECORD_KEYS = {
    "index", "completion", "completions", "prompt_tokens", "completion_tokens", "finish_reason", "model",
    "prediction", "correct", "probabilities", "raw_probabilities", "shots",
}


def _same_field(name: str, value: object, record: Mapping[str, object], fmt: str) -> bool:
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


def check_same_input(path: str, fmt: str, records: dict[str, tuple[int, JSONObject]],
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


def finished_records(path: str, fmt: str) -> dict[str, tuple[int, JSONObject]]:
    """The records already in an output file by key, with their line; drops a torn last line left by a crash."""
    if not os.path.exists(path):
        return {}
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        # A run killed mid-write leaves a partial last line: cut it so it is redone cleanly.
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(path, len(data))  # in place: nothing rewritten, so nothing more to lose
    text = data.decode("utf-8", errors="replace")
    records: dict[str, tuple[int, JSONObject]] = {}
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


# ---------------------------------------------------------------- the settings an output was written with


class SourcedTemplate(Protocol):
    """What settings_of reads of a template (llmlab.prompting.templates.Template)."""

    name: str
    source_text: str


def _part(config: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = config.get(key, {})
    return value if isinstance(value, dict) else {}


def settings_of(config: Mapping[str, object], template: SourcedTemplate | None = None) -> dict[str, object]:
    """What decides an output's records (kept beside the file; --resume refuses others): the run's
    config as the run log keeps it, less where it runs (device, batch size) and which rows it reads
    (--resume checks those itself), plus a hash of the template's own text."""
    import hashlib

    kept = {k: v for k, v in config.items() if k not in ("output", "batch_size", "gen_engine", "preset", "flags")}
    kept["input"] = {"field": _part(config, "input").get("field")}
    kept["model"] = {k: v for k, v in _part(config, "model").items() if k in ("spec", "dtype", "chat", "backend")}
    kept["prompt"] = {k: v for k, v in _part(config, "prompt").items() if k not in ("prompts_dir", "vars")}
    if template is not None:
        kept["template"] = {"name": template.name,
                            "sha256": hashlib.sha256(template.source_text.encode()).hexdigest()[:16]}
    return kept


def settings_path(path: str) -> Path:
    """Beside the output (its resolved path): the settings its records were written with."""
    target = Path(os.path.realpath(path))
    return target.with_name(f".{target.name}.settings.json")


def _difference(there: JSONValue, now: JSONValue, name: str = "") -> str | None:
    """The first setting that differs, as "name X there, Y now"; None when all agree."""
    if isinstance(there, dict) and isinstance(now, dict):
        for key in sorted(set(there) | set(now)):
            found = _difference(there.get(key), now.get(key), f"{name}.{key}" if name else key)
            if found:
                return found
        return None
    if there == now:
        return None
    return f"{name} {json.dumps(there)} there, {json.dumps(now)} now"


def check_same_settings(path: str, settings: Mapping[str, object]) -> None:
    """--resume: refuse to add records made with other settings (model, template, generation...) to
    those already in `path`. An output with no settings file beside it (written by hand, or before
    llmlab kept one) is resumed as it is."""
    try:
        recorded = json.loads(settings_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    found = _difference(recorded, json.loads(json.dumps(settings, default=str)))
    if found:
        raise UsageError(f"--resume: {path} was written with other settings ({found}); give the same options to "
                         "resume it, or write to a different --output")


def write_settings(path: str, settings: Mapping[str, object]) -> None:
    """Written whole (a temporary file renamed); an OSError (a full disk) is the caller's to report."""
    target = settings_path(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(settings, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
