"""Tables the run-log and compare commands share: a rich table on a terminal, the comparison matrix
(rich, JSONL or CSV), and the one-line check of a choice option."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Sequence, TextIO

from llmlab.core import console
from llmlab.core.errors import UsageError
from llmlab.io.render import plain_table

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.io.evalreport import Paired
    from llmlab.orchestration.compare import Matrix, Row


def tty() -> bool:
    return sys.stdout.isatty()


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def cut(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def show_matrix(m: Matrix, rows: list[Row], fmt: str, output: Optional[str] = None,
                paired: Sequence[Paired] = ()) -> None:
    """A comparison matrix: rich on a terminal (then the paired differences), else JSONL (the paired
    differences in the last, summary record) or CSV (the paired differences on stderr)."""
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
        show_paired(m, paired, print_table)
        return
    fmt = fmt if fmt != "auto" else ("csv" if output and output.endswith(".csv") else "jsonl")
    with written(output) as out:
        if fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=list(records[0]) if records else ["combo", "key", "input", "gold"])
            writer.writeheader()
            writer.writerows(records)
            show_paired(m, paired, lambda headers, cells, title: console.note(f"{title}\n" + plain_table(headers, cells).rstrip("\n")))
        else:
            for rec in [*records, compare.summary(m, paired)]:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def show_paired(m: Matrix, entries: Sequence[Paired], out: Callable[[list[str], list[list[str]], str], None]
                ) -> None:
    """The paired differences against the baseline column (orchestration.paired's table), if any."""
    from llmlab.orchestration import paired

    if entries:
        base = m.columns[entries[0]["baseline"]].label
        out(["variant", "vs", *paired.HEADERS[2:]], paired.cells(entries, lambda n: m.columns[n].label),
            paired.TITLE.format(base))


def written(output: Optional[str]) -> ContextManager[TextIO]:
    """stdout, or the file `output` written whole or not at all (llmlab.io.safewrite)."""
    import contextlib

    from llmlab.io.safewrite import replacing

    return replacing(output) if output else contextlib.nullcontext(sys.stdout)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"invalid {option} '{value}': choose {', '.join(choices)}")
