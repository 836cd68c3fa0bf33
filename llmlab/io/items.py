"""An input item and the two text helpers every reader and writer shares (no other llmlab imports, so
records and resume can both use them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from llmlab.core.jsontypes import JSONValue


@dataclass
class Item:
    """One input: its position among the inputs, its fields, and where it came from."""

    index: int
    fields: dict[str, JSONValue]
    source: str  # "data.jsonl line 3", for error messages

    @property
    def key(self) -> str:
        """Identity for --resume and duplicate checks: the `id` field, else the position."""
        if "id" in self.fields and self.fields["id"] not in (None, ""):
            return f"id:{self.fields['id']}"
        return f"index:{self.index}"


def lines(text: str) -> list[str]:
    """The lines of a text, split on "\n" only (a "\r" before it is dropped).

    Not str.splitlines(): that also breaks on U+2028, U+2029, U+0085, form feeds..., which a valid
    JSON string may hold unescaped (llmlab's own output does) and a text prompt may contain.
    """
    parts = text.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def cell(value: object) -> object:
    """A value as one CSV cell: a list or an object as its JSON text, anything else as it is."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
