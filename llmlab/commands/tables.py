"""Tables the run-log and compare commands share: a rich table on a terminal, the comparison matrix
(rich, JSONL or CSV), and the one-line check of a choice option."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, ContextManager, Optional, TextIO

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.orchestration.compare import Matrix, Row


def tty() -> bool:
    return sys.stdout.isatty()


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def cut(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def show_matrix(m: Matrix, rows: list[Row], fmt: str, output: Optional[str] = None) -> None:
    """A comparison matrix: rich on a terminal, else JSONL or CSV (with a last summary record)."""
    import csv

    from llmlab.orchestration import compare

    records = compare.records(m, rows)
    if fmt == "auto" and output is None and tty():
        headers = (["combination"] if any(r.combo for r in rows) else []) + ["key", "input", "gold"]
        table = []
        for row in rows:
            cells = ["" if c is None else ("✓ " if c.correct else "✗ " if c.correct is False else "") + cut(c.value, 40) for c in row.cells]
            table.append(([row.combo] if headers[0] == "combination" else []) + [row.key, cut(row.input, 40), row.gold or "", *cells])
        table.append([""] * (len(headers) - 3) + ["summary", "", ""] +
                     [f"{c.metric_name} {c.metric * 100:.1f}" if c.metric is not None else "" for c in m.columns])
        print_table(headers + [c.label for c in m.columns], table)
        return
    fmt = fmt if fmt != "auto" else ("csv" if output and output.endswith(".csv") else "jsonl")
    with written(output) as out:
        if fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=list(records[0]) if records else ["combo", "key", "input", "gold"])
            writer.writeheader()
            writer.writerows(records)
        else:
            for rec in [*records, compare.summary(m)]:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def written(output: Optional[str]) -> ContextManager[TextIO]:
    """stdout, or the file `output` written whole or not at all (llmlab.io.safewrite)."""
    import contextlib

    from llmlab.io.safewrite import replacing

    return replacing(output) if output else contextlib.nullcontext(sys.stdout)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"invalid {option} '{value}': choose {', '.join(choices)}")
