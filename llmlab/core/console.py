"""stderr output: logs, warnings and progress bars. stdout is reserved for data.

Progress bars and info logs show only when stderr is a terminal; warnings show unless quiet.
`--quiet` silences everything except errors; `--verbose` shows logs even when stderr is redirected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Iterator, Protocol

from llmlab import NOTICE

if TYPE_CHECKING:  # rich loads on the first message: a command that prints none (generate --server) skips it
    from rich.console import Console

_state: dict = {"quiet": False, "verbose": False, "bar": None}  # bar: the progress bar on screen now


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose and not quiet
    _show_library_log()


class _LibraryLog(logging.Handler):
    """The logger "llmlab" (library code's warnings and progress logs) shown here: a warning as
    warn(), a NOTICE (long first-time work) as note(), anything less as info()."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno
        (warn if level >= logging.WARNING else note if level >= NOTICE else info)(record.getMessage())


def _show_library_log() -> None:
    log = logging.getLogger("llmlab")
    if not any(isinstance(h, _LibraryLog) for h in log.handlers):
        log.addHandler(_LibraryLog())
        log.propagate = False  # shown once, here, whatever the root logger does
    # DEBUG with --verbose: library code may then show more (the GGUF converter's progress bar)
    log.setLevel(logging.DEBUG if _state["verbose"] else logging.INFO)


def stderr() -> Console:
    """Where messages go: the console of the progress bar on screen (which prints them above the
    bar and redraws it below), else a console on stderr, built on demand so tests that swap
    sys.stderr see the output."""
    bar = _state["bar"]
    if bar is not None:
        return bar.console
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def _same_terminal() -> bool:
    """stdout and stderr are one terminal: data lines printed while a bar is drawn must go above it."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty() and os.path.samestat(os.fstat(sys.stdout.fileno()),
                                                                                os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


class _DataStream:
    """stdout for records and answers. While a progress bar is drawn on the same terminal, each whole
    line is printed above the bar (never glued to it); anywhere else, plain sys.stdout."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        bar = _state["bar"]
        if bar is None or not _same_terminal():
            self._flush_partial()
            return sys.stdout.write(text)
        from rich.text import Text

        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            bar.console.print(Text(line.rstrip("\r")), soft_wrap=True)
        return len(text)

    def _flush_partial(self) -> None:
        if self._partial:
            sys.stdout.write(self._partial)
            self._partial = ""

    def flush(self) -> None:
        if _state["bar"] is None:
            self._flush_partial()
        sys.stdout.flush()


_DATA = _DataStream()


def data_stream() -> _DataStream:
    """The stream data goes to on stdout (io.records writes records here)."""
    return _DATA


def stdout_is_terminal() -> bool:
    """A person reads stdout: tables instead of records (one place, so tests can say so)."""
    return sys.stdout.isatty()


def emit(text: str) -> None:
    """Data for stdout as it is made (a streamed completion), flushed at once."""
    _DATA.write(text)
    _DATA.flush()


def _interactive() -> bool:
    return sys.stderr.isatty()


def verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    """A progress log: shown on a terminal, or anywhere with --verbose; never with --quiet."""
    if not _state["quiet"] and (_state["verbose"] or _interactive()):
        from rich.text import Text

        stderr().print(Text(message, style="dim"))


def warn(message: str) -> None:
    """Something the user should know (a prompt was shortened...): shown unless --quiet."""
    if not _state["quiet"]:
        from rich.text import Text

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
    from rich.text import Text

    message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    stderr().print(Text.assemble(("error:", "red"), " ", message))


class Bar(Protocol):
    """What progress() yields: count finished items, or change the description."""

    def advance(self, n: int = 1) -> None: ...

    def describe(self, text: str) -> None: ...


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
             get_time=None) -> Iterator[Bar]:
    """A progress bar on stderr (items done of total, %, elapsed, measured rate, ETA); a no-op off a
    terminal or when quiet. `console` and `get_time` are for tests (a forced terminal, a fake clock)."""
    if console is None:
        if _state["quiet"] or not _interactive():
            yield _NullProgress()
            return
        console = stderr()
    from rich.progress import Progress

    # No redirection of sys.stdout into the bar's console (data would land on stderr when stdout is a
    # pipe): data_stream() and stderr() put lines above the bar themselves.
    with Progress(*_columns(), console=console, transient=False, get_time=get_time, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        task = bar.add_task(description, total=total)
        outer, _state["bar"] = _state["bar"], bar

        class _Handle:
            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)

            def describe(self, text: str) -> None:  # e.g. the running loss
                bar.update(task, description=text)

        try:
            yield _Handle()
        finally:
            _state["bar"] = outer
    _DATA.flush()  # a last line without its newline, held while the bar was drawn
