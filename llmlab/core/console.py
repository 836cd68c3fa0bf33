"""stderr output: logs, warnings and progress bars. stdout is reserved for data.

Progress bars and info logs show only when stderr is a terminal; warnings show unless quiet.
`--quiet` silences everything except errors; `--verbose` shows logs even when stderr is redirected.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from rich.console import Console
from rich.text import Text

_state = {"quiet": False, "verbose": False}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose and not quiet
    _show_library_log()


class _LibraryLog(logging.Handler):
    """The logger "llmlab" (library code's warnings and progress logs) shown here: a warning as
    warn(), anything less as info()."""

    def emit(self, record: logging.LogRecord) -> None:
        (warn if record.levelno >= logging.WARNING else info)(record.getMessage())


def _show_library_log() -> None:
    log = logging.getLogger("llmlab")
    if not any(isinstance(h, _LibraryLog) for h in log.handlers):
        log.addHandler(_LibraryLog())
        log.propagate = False  # shown once, here, whatever the root logger does
    # DEBUG with --verbose: library code may then show more (the GGUF converter's progress bar)
    log.setLevel(logging.DEBUG if _state["verbose"] else logging.INFO)


def stderr() -> Console:
    # Built on demand so tests that swap sys.stderr see the output.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def stdout_is_terminal() -> bool:
    """A person reads stdout: tables instead of records (one place, so tests can say so)."""
    return sys.stdout.isatty()


def emit(text: str) -> None:
    """Data for stdout as it is made (a streamed completion), flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _interactive() -> bool:
    return sys.stderr.isatty()


def verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    """A progress log: shown on a terminal, or anywhere with --verbose; never with --quiet."""
    if not _state["quiet"] and (_state["verbose"] or _interactive()):
        stderr().print(Text(message, style="dim"))


def warn(message: str) -> None:
    """Something the user should know (a prompt was shortened...): shown unless --quiet."""
    if not _state["quiet"]:
        stderr().print(Text.assemble(("warning:", "yellow"), " ", message))


def note(message: str) -> None:
    """A fact the user asked for on stderr (token counts...): shown unless --quiet."""
    if not _state["quiet"]:
        stderr().print(message, markup=False)


def detail(message: str) -> None:
    """A fact shown only with --verbose (a calibration's bias...)."""
    if _state["verbose"]:
        note(message)


def error(message: str) -> None:
    # Text, never markup: a message carries user text (a file named "[/x].jsonl", a label "[red]");
    # and one line, whatever an exception's text holds (a library's multi-line message)
    message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    Console(file=sys.stderr, highlight=False, soft_wrap=True).print(Text.assemble(("error:", "red"), " ", message))


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


def rate_text(rate: float) -> str:
    """A rate with three significant digits, never rounded to 0 (0.0423 stays 0.0423)."""
    if rate >= 100:
        return f"{rate:.0f}"
    return f"{rate:.3g}"


def _columns() -> list:
    """Count, percentage, measured rate and ETA. The rate is items done / wall time since the bar
    started (work starts when the bar does), never rich's windowed speed, which divides by the
    near-zero interval between results that arrive together (a batch) and shows 77458 items/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TaskProgressColumn, TextColumn
    from rich.progress import TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            if not task.completed or elapsed <= 0:
                return Text("- items/s  eta -", style="cyan")
            rate = task.completed / elapsed
            left = max(0.0, (task.total or task.completed) - task.completed) / rate
            minutes, seconds = divmod(int(left + 0.5), 60)
            return Text(f"{rate_text(rate)} items/s  eta {minutes}:{seconds:02d}", style="cyan")

    return [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), Rate()]


@contextlib.contextmanager
def progress(total: int | None, description: str, console: Console | None = None,
             get_time=None) -> Iterator[object]:
    """A progress bar on stderr (items done of total, %, elapsed, measured rate, ETA); a no-op off a
    terminal or when quiet. `console` and `get_time` are for tests (a forced terminal, a fake clock)."""
    if console is None:
        if _state["quiet"] or not _interactive():
            yield _NullProgress()
            return
        console = stderr()
    from rich.progress import Progress

    with Progress(*_columns(), console=console, transient=False, get_time=get_time) as bar:
        task = bar.add_task(description, total=total)

        class _Handle:
            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)

            def describe(self, text: str) -> None:  # e.g. the running loss
                bar.update(task, description=text)

        yield _Handle()
