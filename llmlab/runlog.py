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

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from llmlab.errors import DataError

BUSY_TIMEOUT_MS = 10_000  # wait this long for another llmlab process's write before failing


# ---------------------------------------------------------------- where, and whether


def db_path() -> Path:
    home = os.environ.get("LLMLAB_HOME")
    if home:
        return Path(home).expanduser() / "runs.db"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "llmlab" / "runs.db"


def enabled(no_log: bool = False) -> bool:
    """False with --no-log or LLMLAB_LOG=0/false/no/off."""
    return not no_log and os.environ.get("LLMLAB_LOG", "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------- schema and migrations


def _m1(db: sqlite3.Connection) -> None:
    _script(db, """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY, command TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
            finished REAL, seconds REAL, argv TEXT, model TEXT, device TEXT, data TEXT,
            config TEXT, metrics TEXT, versions TEXT, pid INTEGER, n_items INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE templates (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            name TEXT NOT NULL, hash TEXT NOT NULL, text TEXT, PRIMARY KEY (run_id, name));
        CREATE TABLE items (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, key TEXT NOT NULL, template TEXT NOT NULL DEFAULT '',
            combo TEXT NOT NULL DEFAULT '', prompt TEXT, output TEXT, prediction TEXT, gold TEXT,
            probabilities TEXT, extra TEXT, created REAL NOT NULL);
        CREATE INDEX items_run ON items(run_id, template, combo, idx);
    """)


def _script(db: sqlite3.Connection, sql: str) -> None:
    """Statements separated by ';' at a line's end (executescript would COMMIT the migration's transaction)."""
    for statement in re.split(r";\s*\n", sql):
        if statement.strip():
            db.execute(statement)


def _m2(db: sqlite3.Connection) -> None:
    """Full-text search over prompts and outputs (FTS5 when this SQLite has it; else LIKE is used)."""
    db.execute("CREATE INDEX runs_created ON runs(created)")
    if not _has_fts5(db):
        return
    _script(db, """
        CREATE VIRTUAL TABLE items_fts USING fts5(prompt, output, prediction, content='items', content_rowid='id');
        CREATE TRIGGER items_ai AFTER INSERT ON items BEGIN
            INSERT INTO items_fts(rowid, prompt, output, prediction) VALUES (new.id, new.prompt, new.output, new.prediction); END;
        CREATE TRIGGER items_ad AFTER DELETE ON items BEGIN
            INSERT INTO items_fts(items_fts, rowid, prompt, output, prediction)
            VALUES ('delete', old.id, old.prompt, old.output, old.prediction); END;
        INSERT INTO items_fts(items_fts) VALUES ('rebuild');
    """)


# Migration N (1-based) takes a database at PRAGMA user_version N-1 to N. Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m1, _m2]


def _has_fts5(db: sqlite3.Connection) -> bool:
    try:
        db.execute("CREATE VIRTUAL TABLE temp._fts_probe USING fts5(x)")
        db.execute("DROP TABLE temp._fts_probe")
        return True
    except sqlite3.OperationalError:
        return False


def migrate(db: sqlite3.Connection, upto: int | None = None) -> int:
    """Apply the missing migrations, each in its own transaction; returns the schema version."""
    target = len(MIGRATIONS) if upto is None else upto
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise DataError(f"run log {db_path()} is schema v{version}, newer than this llmlab (v{len(MIGRATIONS)}); "
                        "upgrade llmlab or set LLMLAB_HOME to another folder")
    while version < target:
        with transaction(db):
            if db.execute("PRAGMA user_version").fetchone()[0] == version:  # another process may have done it
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
    return version


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock now, waiting up to busy_timeout) ... COMMIT, or ROLLBACK."""
    if db.in_transaction:  # an interrupt (Ctrl-C, SIGTERM) landed between a BEGIN and its COMMIT: drop that half
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def connect(path: Path | str | None = None, upto: int | None = None) -> sqlite3.Connection:
    """Open (creating and migrating) the run log. autocommit off: writers commit explicitly."""
    path = Path(path) if path else db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; commits are appends
        db.execute("PRAGMA synchronous = NORMAL")  # survives a killed process; a power cut may lose the last commits
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db, upto)
    except (OSError, sqlite3.Error) as exc:
        raise DataError(f"cannot open the run log {path}: {exc}; set LLMLAB_HOME to a writable folder "
                        "or turn logging off with --no-log / LLMLAB_LOG=0") from None
    return db


# ---------------------------------------------------------------- writing a run


def versions() -> dict[str, str]:
    """llmlab, python and the libraries' versions, without importing them."""
    import importlib.metadata as md
    import platform

    from llmlab import __version__

    found = {"llmlab": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "rouge-score"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def text_hash(text: str) -> str:
    """First 12 hex digits of the SHA-256 of a template's file text: equal hashes, equal templates."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def calibration(value: Any) -> str:
    """A combination's calibration as a name: "" for none (False, None, "off"), else the method
    ("contextual" for a bare True, as logged before methods had names)."""
    if value in (None, False, "", "off"):
        return ""
    return "contextual" if value is True else str(value)


def calibration_suffix(value: Any) -> str:
    """" calibrated" for contextual calibration (the name runs have always used), " METHOD" for the
    others, "" for none."""
    name = calibration(value)
    return " calibrated" if name == "contextual" else f" {name}" if name else ""


def combo(shots: int = 0, seed: int = 0, calibrate: Any = False) -> str:
    """The canonical name of an eval combination, matched across runs by `runs compare`."""
    return f"shots={shots} seed={seed}" + calibration_suffix(calibrate)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


class Run:
    """One logged run. Use as a context manager; every method commits before it returns."""

    def __init__(self, db: sqlite3.Connection, run_id: int):
        self.db = db
        self.id = run_id
        self.started = time.perf_counter()
        self._results: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # items may arrive from a worker thread
        self._old_sigterm: Any = None
        self.broken = False  # a write failed: log nothing more

    def _write(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run (sql, parameters) statements as one transaction. A log that fails mid-run (disk full, a
        lock held too long) warns once and stops logging: the run itself, and its output file, go on."""
        if self.broken:
            return
        try:
            with self._lock, transaction(self.db):
                for sql, parameters in statements:
                    self.db.execute(sql, parameters)
        except sqlite3.Error as exc:
            from llmlab import console

            self.broken = True
            console.warn(f"run log {db_path()}: {exc}; run {self.id} is logged only up to here")

    def item(self, index: int, prompt: str | None = None, output: str | None = None, prediction: str | None = None,
             probabilities: dict[str, float] | None = None, gold: Any = None, extra: dict[str, Any] | None = None,
             key: str | None = None, template: str = "", combo: str = "") -> None:
        """Log one finished item (committed at once). key: the input's identity (its id, else index)."""
        row = (self.id, index, key or f"index:{index}", template, combo, prompt, output, prediction,
               None if gold is None else str(gold), _json(probabilities), _json(extra), time.time())
        self._write(("INSERT INTO items (run_id, idx, key, template, combo, prompt, output, prediction, "
                     "gold, probabilities, extra, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row),
                    ("UPDATE runs SET n_items = n_items + 1 WHERE id = ?", (self.id,)))

    def metrics(self, metrics: dict[str, Any]) -> None:
        """Save (replace) the run's metrics."""
        self._write(("UPDATE runs SET metrics = ? WHERE id = ?", (_json(metrics), self.id)))

    def result(self, template: str, task: str, shots: int, seed: int, calibrate: bool, metrics: dict[str, Any],
               **more: Any) -> None:
        """Append one eval combination's metrics (the shape in this module's docstring) and save."""
        self._results.append({"template": template, "task": task, "shots": shots, "seed": seed,
                              "calibrate": calibrate, **more, "metrics": metrics})
        self.metrics({"results": self._results})

    def eval_combo(self, combo_result: dict[str, Any]) -> None:
        """Log each seed of one evaluate.run_combo() result (its "runs" list) in the results shape."""
        for r in combo_result["runs"]:
            self.result(combo_result["template"], combo_result["task"], combo_result["shots"], r["seed"],
                        combo_result["calibrate"], r["metrics"], items=r["items"], seconds=r["seconds"])

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

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if kind is None:
            status = "complete"
        elif issubclass(kind, (KeyboardInterrupt, Terminated)) or type(exc).__name__ == "Abort":
            status = "interrupted"
        else:
            status = "failed"
        try:
            self.finish(status)
        finally:
            self.db.close()


class Terminated(SystemExit):
    """Raised by the SIGTERM handler inside a run."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


class NoRun:
    """What open_run returns with logging off: the same methods, doing nothing."""

    id = None

    def item(self, *args: Any, **kwargs: Any) -> None: ...
    def metrics(self, metrics: dict[str, Any]) -> None: ...
    def result(self, *args: Any, **kwargs: Any) -> None: ...
    def update(self, *args: Any, **kwargs: Any) -> None: ...
    def eval_combo(self, combo_result: dict[str, Any]) -> None: ...
    def finish(self, status: str = "complete") -> None: ...
    def __enter__(self) -> "NoRun":
        return self

    def __exit__(self, *exc: Any) -> None: ...


def open_run(command: str, argv: Sequence[str] | None = None, config: dict[str, Any] | None = None,
             model: str | None = None, templates: Any = None, device: str | None = None,
             data: str | None = None, no_log: bool = False, path: Path | str | None = None,
             template: Any = None) -> Run | NoRun:
    """Start a run (status partial). templates (or template): a prompts.Template, a list of them, or None.
    Raises DataError (with the fix) when the log can't be opened; call it before any model time."""
    if not enabled(no_log):
        return NoRun()
    templates = templates if templates is not None else template
    if templates is not None and not isinstance(templates, (list, tuple)):
        templates = [templates]
    db = connect(path)
    argv = list(sys.argv if argv is None else argv)
    with transaction(db):
        cur = db.execute(
            "INSERT INTO runs (command, status, created, argv, model, device, data, config, versions, pid) "
            "VALUES (?, 'partial', ?, ?, ?, ?, ?, ?, ?, ?)",
            (command, time.time(), _json(argv), model, device, data, _json(config or {}), _json(versions()),
             os.getpid()))
        run_id = cur.lastrowid
        for t in templates or []:
            text = getattr(t, "source_text", "") or ""
            db.execute("INSERT OR REPLACE INTO templates (run_id, name, hash, text) VALUES (?, ?, ?, ?)",
                       (run_id, t.name, text_hash(text), text))
    return Run(db, run_id)


# ---------------------------------------------------------------- reading


def _decode(row: sqlite3.Row, *json_fields: str) -> dict[str, Any]:
    out = dict(row)
    for name in json_fields:
        if out.get(name) is not None:
            out[name] = json.loads(out[name])
    return out


def list_runs(db: sqlite3.Connection, command: str | None = None, model: str | None = None,
              template: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Newest first. model matches a substring; template a name or a hash prefix."""
    sql, args = "SELECT * FROM runs WHERE 1=1", []
    if command:
        sql += " AND command = ?"
        args.append(command)
    if model:
        sql += " AND model LIKE ?"
        args.append(f"%{model}%")
    if template:
        sql += " AND id IN (SELECT run_id FROM templates WHERE name = ? OR hash LIKE ?)"
        args += [template, f"{template}%"]
    sql += " ORDER BY created DESC, id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    runs = [_decode(r, "argv", "config", "metrics", "versions") for r in db.execute(sql, args)]
    names = _templates(db, [r["id"] for r in runs])
    for r in runs:
        r["templates"] = names.get(r["id"], [])
    return runs


def _templates(db: sqlite3.Connection, ids: Iterable[int]) -> dict[int, list[dict[str, str]]]:
    found: dict[int, list[dict[str, str]]] = {}
    ids = list(ids)
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for r in db.execute(f"SELECT * FROM templates WHERE run_id IN ({marks}) ORDER BY rowid", part):
            found.setdefault(r["run_id"], []).append({"name": r["name"], "hash": r["hash"], "text": r["text"]})
    return found


def get_run(db: sqlite3.Connection, run_id: int) -> dict[str, Any]:
    row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise DataError(f"no run {run_id} in {db_path()}; see `llmlab runs list`")
    run = _decode(row, "argv", "config", "metrics", "versions")
    run["templates"] = _templates(db, [run_id]).get(run_id, [])
    return run


def items(db: sqlite3.Connection, run_id: int) -> list[dict[str, Any]]:
    rows = db.execute("SELECT * FROM items WHERE run_id = ? ORDER BY template, combo, idx, id", (run_id,))
    return [_decode(r, "probabilities", "extra") for r in rows]


def search(db: sqlite3.Connection, text: str, limit: int = 50) -> list[dict[str, Any]]:
    """Items whose prompt, output or prediction contain `text` (every word, FTS5; else a substring)."""
    has_fts = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_fts'").fetchone()
    if has_fts:
        # Each word quoted: user text is matched literally, never parsed as FTS5 syntax.
        query = " ".join('"' + w.replace('"', '""') + '"' for w in text.split())
        if query:
            rows = db.execute(
                "SELECT items.*, runs.command, runs.model FROM items_fts JOIN items ON items.id = items_fts.rowid "
                "JOIN runs ON runs.id = items.run_id WHERE items_fts MATCH ? ORDER BY items.id DESC LIMIT ?",
                (query, limit))
            return [_decode(r, "probabilities", "extra") for r in rows]
    like = f"%{text}%"
    rows = db.execute(
        "SELECT items.*, runs.command, runs.model FROM items JOIN runs ON runs.id = items.run_id "
        "WHERE items.prompt LIKE ? OR items.output LIKE ? OR items.prediction LIKE ? ORDER BY items.id DESC LIMIT ?",
        (like, like, like, limit))
    return [_decode(r, "probabilities", "extra") for r in rows]


def delete(db: sqlite3.Connection, run_id: int) -> None:
    get_run(db, run_id)
    with transaction(db):
        db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
