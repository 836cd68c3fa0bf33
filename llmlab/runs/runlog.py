"""The run log: every generate, classify, eval and compare run, and each of its items, in SQLite.

Where: $LLMLAB_HOME/runs.db, else ~/.local/share/llmlab/runs.db. Off with --no-log or LLMLAB_LOG=0.
Written as the run goes: each item is committed as soon as it is logged (WAL mode makes a commit a
cheap append), so a killed process keeps every finished item. A run starts as `partial`, becomes
`complete` when it closes cleanly and `interrupted` on Ctrl-C or SIGTERM; a run killed outright
(SIGKILL, power cut) stays `partial`.

The hook the commands call:

    with runlog.open_run("classify", sys.argv, config, model=lm.name, templates=tmpl, device=lm.device) as log:
        log.item(index, prompt, prediction=..., probabilities=..., gold=..., key=item.key, extra=...)
        log.metrics({"accuracy": 0.9, "macro_f1": 0.88})

Items of an eval run also name their combination: log.item(..., template="sentiment",
combo=runlog.combo(shots=4, seed=1, calibrate=True)). An eval run logs its metrics in this shape
(report.py draws the shot-sweep curve and the confusion matrices from it):

    log.metrics({"results": [
        {"template": "sentiment", "task": "classify", "shots": 4, "seed": 1, "calibrate": True,
         "items": 200, "seconds": 12.5,
         "metrics": {"accuracy": 0.81, "macro_f1": 0.8,          # classify (evaluate.classification_metrics)
                     "confusion": {"labels": [...], "predicted": [...], "matrix": [[...], ...]}}},
        {"template": "summary", "task": "generate", "shots": 0, "seed": 0, "calibrate": False,
         "metrics": {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25, "exact_match": 0.0}},  # generate
    ]})

one entry per template x shots x seed x calibration (log.result(...) appends one and re-saves;
log.eval_combo(result) logs every seed of an evaluate.run_combo() result, as `llmlab eval` does after each combination).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Callable, Mapping, Protocol, Sequence, Union

from llmlab.core.errors import Interrupted
from llmlab.io.evalreport import Result
from llmlab.runs.rundb import (  # noqa: F401 - re-exported
    BUSY_TIMEOUT_MS, MIGRATIONS, connect, db_path, enabled, migrate, transaction)
from llmlab.runs.runquery import delete, get_run, items, list_runs, search  # noqa: F401 - re-exported

# this module's public names and those it re-exports (callers import them from here)
__all__ = [
    "BUSY_TIMEOUT_MS", "MIGRATIONS", "NoRun", "Run", "Terminated", "calibration", "calibration_suffix", "combo",
    "connect", "db_path", "delete", "enabled", "get_run", "items", "list_runs", "migrate", "open_run", "search",
    "text_hash", "transaction", "versions",
]


# ---------------------------------------------------------------- writing a run


_LIBRARIES = ("torch", "transformers", "tokenizers", "rouge-score")


def versions() -> dict[str, str]:
    """llmlab, python and the libraries' versions, without importing them: read from the names of
    their `NAME-VERSION.dist-info` folders on sys.path (what pip installs; the first on the path, as
    importlib.metadata finds it), else asked of importlib.metadata (which costs a command ~30 ms)."""
    import platform

    from llmlab import __version__

    found = {"llmlab": __version__, "python": platform.python_version(), **_dist_info_versions(_LIBRARIES)}
    missing = [name for name in _LIBRARIES if name not in found]
    if missing:
        import importlib.metadata as md

        for name in missing:
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
    return {k: found[k] for k in ("llmlab", "python", *_LIBRARIES) if k in found}


def _dist_info_versions(names: Sequence[str]) -> dict[str, str]:
    """{name: version} from the first `NAME-VERSION.dist-info` folder of each on sys.path; a name
    whose first install there is something else (an .egg-info) is left out, for importlib.metadata."""
    import re

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    wanted = {norm(n): n for n in names}
    found: dict[str, str | None] = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in listing:
            stem, _, kind = folder.rpartition(".")
            name, _, version = stem.partition("-")
            if kind in ("dist-info", "egg-info") and wanted.get(norm(name)) not in (None, *found):
                found[wanted[norm(name)]] = version if kind == "dist-info" and version else None
    return {name: version for name, version in found.items() if version}


def text_hash(text: str) -> str:
    """First 12 hex digits of the SHA-256 of a template's file text: equal hashes, equal templates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class _Template(Protocol):
    """What the run log keeps of a template (prompting's Template; runs/ sits below prompting)."""

    @property
    def name(self) -> str: ...


# A signal handler as signal.signal() returns it: a function, SIG_DFL/SIG_IGN, or None (not set from Python).
_Handler = Union[Callable[[int, Union[FrameType, None]], object], int, signal.Handlers, None]


def calibration(value: object) -> str:
    """A combination's calibration as a name: "" for none (False, None, "off"), else the method
    ("contextual" for a bare True, as logged before methods had names)."""
    if value in (None, False, "", "off"):
        return ""
    return "contextual" if value is True else str(value)


def calibration_suffix(value: object) -> str:
    """" calibrated" for contextual calibration (the name runs have always used), " METHOD" for the
    others, "" for none."""
    name = calibration(value)
    return " calibrated" if name == "contextual" else f" {name}" if name else ""


def combo(shots: int = 0, seed: int = 0, calibrate: object = False) -> str:
    """The canonical name of an eval combination, matched across runs by `runs compare`."""
    return f"shots={shots} seed={seed}" + calibration_suffix(calibrate)


def _ignore(message: str) -> None:
    """The default for a callback nobody gave: library code never prints."""


def _json(value: object) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


class Run:
    """One logged run. Use as a context manager; every method commits before it returns."""

    def __init__(self, db: sqlite3.Connection, run_id: int, on_warn: Callable[[str], None] | None = None):
        self.db = db
        self.id = run_id
        self.on_warn = on_warn or _ignore  # where a failed write is reported (the CLI: console.warn)
        self.started = time.perf_counter()
        self._results: list[dict[str, object]] = []
        self._lock = threading.Lock()  # items may arrive from a worker thread
        self._old_sigterm: _Handler = None
        self.broken = False  # a write failed: log nothing more

    def _write(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Run (sql, parameters) statements as one transaction. A log that fails mid-run (disk full, a
        lock held too long) warns once and stops logging: the run itself, and its output file, go on."""
        if self.broken:
            return
        try:
            with self._lock, transaction(self.db):
                for sql, parameters in statements:
                    self.db.execute(sql, parameters)
        except sqlite3.Error as exc:
            self.broken = True
            gone = isinstance(exc, sqlite3.IntegrityError) and \
                self.db.execute("SELECT 1 FROM runs WHERE id = ?", (self.id,)).fetchone() is None
            self.on_warn(f"run {self.id} was deleted from the run log while it ran (llmlab runs rm); the rest of "
                         "it is not logged" if gone else f"run log {db_path()}: {exc}; run {self.id} is logged only "
                         "up to here")

    def item(self, index: int, prompt: str | None = None, output: str | None = None, prediction: str | None = None,
             probabilities: dict[str, float] | None = None, gold: object = None, extra: Mapping[str, object] | None = None,
             key: str | None = None, template: str = "", combo: str = "") -> None:
        """Log one finished item (committed at once). key: the input's identity (its id, else index)."""
        row = (self.id, index, key or f"index:{index}", template, combo, prompt, output, prediction,
               None if gold is None else str(gold), _json(probabilities), _json(extra), time.time())
        self._write(("INSERT INTO items (run_id, idx, key, template, combo, prompt, output, prediction, "
                     "gold, probabilities, extra, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row),
                    ("UPDATE runs SET n_items = n_items + 1 WHERE id = ?", (self.id,)))

    def metrics(self, metrics: Mapping[str, object]) -> None:
        """Save (replace) the run's metrics."""
        self._write(("UPDATE runs SET metrics = ? WHERE id = ?", (_json(metrics), self.id)))

    def result(self, template: str, task: str, shots: int, seed: int, calibrate: object,
               metrics: Mapping[str, object], **more: object) -> None:
        """Append one eval combination's metrics (the shape in this module's docstring) and save."""
        self._results.append({"template": template, "task": task, "shots": shots, "seed": seed,
                              "calibrate": calibrate, **more, "metrics": metrics})
        self.metrics({"results": self._results})

    def eval_combo(self, combo_result: Result) -> None:
        """Log each seed of one evaluate.run_combo() result (its "runs" list) in the results shape."""
        # beside adapters (eval --adapter): k, the labelled rows used, and an adapter's method and seed
        extra: dict[str, object] = {}
        if "k" in combo_result:
            extra["k"] = combo_result["k"]
        if "adapter" in combo_result:
            extra.update(adapter=combo_result["adapter"], tuned=combo_result.get("tuned"))
        for r in combo_result["runs"]:
            self.result(combo_result["template"], combo_result["task"], combo_result["shots"], r["seed"],
                        combo_result["calibrate"], r["metrics"], items=r["items"], seconds=r["seconds"], **extra)

    def update(self, model: str | None = None, device: str | None = None) -> None:
        """Fill in what is known only once the model is loaded (open the run before loading it)."""
        self._write(("UPDATE runs SET model = coalesce(?, model), device = coalesce(?, device) WHERE id = ?",
                     (model, device, self.id)))

    def finish(self, status: str = "complete") -> None:
        self._write(("UPDATE runs SET status = ?, finished = ?, seconds = ? WHERE id = ?",
                     (status, time.time(), time.perf_counter() - self.started, self.id)))

    def __enter__(self) -> "Run":
        # SIGTERM (kill, a scheduler's timeout) ends the run like Ctrl-C: marked, then exit 143.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _terminate)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if kind is None:
            status = "complete"
        elif issubclass(kind, (KeyboardInterrupt, Terminated, Interrupted)) or type(exc).__name__ == "Abort":
            status = "interrupted"
        else:
            status = "failed"
        try:
            self.finish(status)
        finally:
            self.db.close()


class Terminated(SystemExit):
    """Raised by the SIGTERM handler inside a run."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


class NoRun:
    """What open_run returns with logging off: the same methods, doing nothing."""

    id = None

    def item(self, *args: object, **kwargs: object) -> None: ...
    def metrics(self, metrics: Mapping[str, object]) -> None: ...
    def result(self, *args: object, **kwargs: object) -> None: ...
    def update(self, *args: object, **kwargs: object) -> None: ...
    def eval_combo(self, combo_result: Result) -> None: ...
    def finish(self, status: str = "complete") -> None: ...
    def __enter__(self) -> "NoRun":
        return self

    def __exit__(self, *exc: object) -> None: ...


def open_run(command: str, argv: Sequence[str] | None = None, config: Mapping[str, object] | None = None,
             model: str | None = None, templates: _Template | list[_Template] | tuple[_Template, ...] | None = None,
             device: str | None = None,
             data: str | None = None, no_log: bool = False, path: Path | str | None = None,
             template: _Template | None = None, on_warn: Callable[[str], None] | None = None) -> Run | NoRun:
    """Start a run (status partial). templates (or template): a prompts.Template, a list of them, or None.
    on_warn: told (once) when a write fails mid-run and logging stops.
    Raises DataError (with the fix) when the log can't be opened; call it before any model time."""
    if not enabled(no_log):
        return NoRun()
    given = templates if templates is not None else template
    listed = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
    db = connect(path)
    argv = list(sys.argv if argv is None else argv)
    with transaction(db):
        cur = db.execute(
            "INSERT INTO runs (command, status, created, argv, model, device, data, config, versions, pid) "
            "VALUES (?, 'partial', ?, ?, ?, ?, ?, ?, ?, ?)",
            (command, time.time(), _json(argv), model, device, data, _json(config or {}), _json(versions()),
             os.getpid()))
        run_id = cur.lastrowid
        assert run_id is not None  # sqlite3 sets it after every INSERT into a rowid table
        for t in listed:
            text = getattr(t, "source_text", "") or ""
            db.execute("INSERT OR REPLACE INTO templates (run_id, name, hash, text) VALUES (?, ?, ?, ?)",
                       (run_id, t.name, text_hash(text), text))
    return Run(db, run_id, on_warn)
