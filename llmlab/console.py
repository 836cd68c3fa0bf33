"""stderr output: logs, warnings and progress bars. stdout is reserved for data.

Progress bars and info logs show only when stderr is a terminal; warnings show unless quiet.
`--quiet` silences everything except errors; `--verbose` shows logs even when stderr is redirected.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console

_state = {"quiet": False, "verbose": False}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose and not quiet


def stderr() -> Console:
    # Built on demand so tests that swap sys.stderr see the output.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def _interactive() -> bool:
    return sys.stderr.isatty()


def verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    """A progress log: shown on a terminal, or anywhere with --verbose; never with --quiet."""
    if not _state["quiet"] and (_state["verbose"] or _interactive()):
        stderr().print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    """Something the user should know (a prompt was shortened...): shown unless --quiet."""
    if not _state["quiet"]:
        stderr().print(f"[yellow]warning:[/yellow] {message}", markup=True)


def note(message: str) -> None:
    """A fact the user asked for on stderr (token counts...): shown unless --quiet."""
    if not _state["quiet"]:
        stderr().print(message, markup=False)


def error(message: str) -> None:
    Console(file=sys.stderr, highlight=False, soft_wrap=True).print(
        f"[red]error:[/red] {message}", markup=True
    )


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress(total: int | None, description: str) -> Iterator[object]:
    """A rich progress bar on stderr with count, rate and ETA; a no-op off a terminal or when quiet."""
    if _state["quiet"] or not _interactive():
        yield _NullProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr(), transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        class _Handle:
            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)
                speed = bar.tasks[0].speed
                bar.update(task, rate=f"{speed:.2f} items/s" if speed else "")

        yield _Handle()
