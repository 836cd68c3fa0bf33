"""YAML reading with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.core.errors import TemplateError


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{what} '{path}' not found") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{what} '{path}' is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise TemplateError(f"cannot read {what} '{path}': {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TemplateError(f"{path}{where}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: a {what} must be a YAML mapping of keys to values")
    return data
