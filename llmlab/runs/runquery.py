"""Reading the run log: runs listed and filtered, one run, its items, full-text search, delete.
See llmlab.runs.runlog."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterable, Mapping

from llmlab.core.errors import DataError
from llmlab.runs.rundb import db_path, transaction


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


def running(run: Mapping[str, object]) -> bool:
    """A run still being written: partial, and its process (on this machine) alive."""
    import os

    pid = run.get("pid")  # an INTEGER column: an int or None
    if run.get("status") != "partial" or not isinstance(pid, int) or not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # killed or crashed: a partial run for good
    except PermissionError:
        return True  # alive, another user's
    return True


def delete(db: sqlite3.Connection, run_id: int) -> None:
    get_run(db, run_id)
    with transaction(db):
        db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
