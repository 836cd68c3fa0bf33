"""The run log's database: where it is, whether logging is on, the schema and its migrations, and
the connection (WAL, busy timeout, one transaction per write). See llmlab.runs.runlog."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

from llmlab.core.errors import DataError

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


def connect(path: Path | str | None = None, upto: int | None = None, read_only: bool = False) -> sqlite3.Connection:
    """Open (creating and migrating) the run log. autocommit off: writers commit explicitly.
    read_only: for commands that only read, a log that can't be written (read-only media) is opened
    as it is."""
    path = Path(path) if path else db_path()
    if path.is_dir():
        raise DataError(f"the run log {path} is a directory, not a file; move it away, set LLMLAB_HOME to another "
                        "folder, or turn logging off with --no-log / LLMLAB_LOG=0")
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
        if read_only and path.is_file():
            return _read_only(path)
        raise DataError(f"cannot open the run log {path}: {exc}; set LLMLAB_HOME to a writable folder "
                        "or turn logging off with --no-log / LLMLAB_LOG=0") from None
    return db


def _read_only(path: Path) -> sqlite3.Connection:
    """The run log on read-only media: opened immutable (no lock, no WAL files to create)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False)
        db.row_factory = sqlite3.Row
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise DataError(f"cannot read the run log {path}: {exc}") from None
    if version != len(MIGRATIONS):
        raise DataError(f"the run log {path} is read-only and schema v{version}, not v{len(MIGRATIONS)}; "
                        "open it once where it can be written (llmlab runs list) to upgrade it")
    return db
