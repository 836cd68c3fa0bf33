"""The run log: schema, migrations, items written as they go, two writers, killed and interrupted runs."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmlab.runs import runlog
from llmlab.core.errors import DataError

ROOT = Path(__file__).resolve().parents[1]



class FakeTemplate:
    name = "sentiment"
    source_text = "name: sentiment\ninput: 'Review: {text}'\n"


def test_db_path_from_llmlab_home(home):
    assert runlog.db_path() == home / "runs.db"


def test_db_path_default(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMLAB_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runlog.db_path() == tmp_path / ".local" / "share" / "llmlab" / "runs.db"


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("off", False), ("1", True), ("", True)])
def test_llmlab_log_env(monkeypatch, value, on):
    monkeypatch.setenv("LLMLAB_LOG", value)
    assert runlog.enabled() is on
    assert runlog.enabled(no_log=True) is False


def test_a_run_records_everything(home):
    with runlog.open_run("classify", ["llmlab", "classify", "-t", "sentiment"], {"shots": 2}, model="tiny",
                         template=FakeTemplate(), device="cpu", data="d.jsonl") as log:
        log.item(0, "Review: good", prediction="positive", probabilities={"positive": 0.9, "negative": 0.1},
                 gold="positive", key="id:r1", extra={"input": {"text": "good"}})
        log.metrics({"accuracy": 1.0})
    db = runlog.connect()
    run = runlog.get_run(db, log.id)
    assert (run["command"], run["status"], run["model"], run["device"], run["data"]) == (
        "classify", "complete", "tiny", "cpu", "d.jsonl")
    assert run["argv"] == ["llmlab", "classify", "-t", "sentiment"]
    assert run["config"] == {"shots": 2} and run["metrics"] == {"accuracy": 1.0}
    assert run["templates"] == [{"name": "sentiment", "hash": runlog.text_hash(FakeTemplate.source_text),
                                 "text": FakeTemplate.source_text}]
    assert {"llmlab", "python", "torch", "transformers"} <= set(run["versions"])
    assert run["seconds"] >= 0 and run["n_items"] == 1
    [item] = runlog.items(db, log.id)
    assert (item["key"], item["prompt"], item["prediction"], item["gold"]) == ("id:r1", "Review: good", "positive", "positive")
    assert item["probabilities"] == {"positive": 0.9, "negative": 0.1}
    assert item["extra"] == {"input": {"text": "good"}}


def test_no_log_writes_nothing(home, monkeypatch):
    monkeypatch.setenv("LLMLAB_LOG", "0")
    with runlog.open_run("generate") as log:
        log.item(0, "p", output="o")
        log.metrics({})
    assert log.id is None and not (home / "runs.db").exists()


def test_exceptions_mark_the_run(home):
    with pytest.raises(KeyboardInterrupt):
        with runlog.open_run("generate") as log:
            log.item(0, "p", output="o")
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with runlog.open_run("generate") as failed:
            raise ValueError("boom")
    db = runlog.connect()
    assert runlog.get_run(db, log.id)["status"] == "interrupted"
    assert runlog.get_run(db, failed.id)["status"] == "failed"


def test_eval_results_shape(home):
    with runlog.open_run("eval") as log:
        log.result("sentiment", "classify", 4, 1, True, {"accuracy": 0.5}, items=2)
        log.result("sentiment", "classify", 4, 2, True, {"accuracy": 0.75}, items=2)
    metrics = runlog.get_run(runlog.connect(), log.id)["metrics"]
    assert metrics == {"results": [
        {"template": "sentiment", "task": "classify", "shots": 4, "seed": 1, "calibrate": True, "items": 2,
         "metrics": {"accuracy": 0.5}},
        {"template": "sentiment", "task": "classify", "shots": 4, "seed": 2, "calibrate": True, "items": 2,
         "metrics": {"accuracy": 0.75}}]}


def test_list_filters_newest_first(home):
    for command, model in [("generate", "gpt2"), ("classify", "smollm2"), ("eval", "smollm2")]:
        with runlog.open_run(command, model=model, templates=FakeTemplate() if command != "generate" else None):
            pass
    db = runlog.connect()
    assert [r["command"] for r in runlog.list_runs(db)] == ["eval", "classify", "generate"]
    assert [r["command"] for r in runlog.list_runs(db, model="smol")] == ["eval", "classify"]
    assert [r["command"] for r in runlog.list_runs(db, command="generate")] == ["generate"]
    assert [r["command"] for r in runlog.list_runs(db, template="sentiment")] == ["eval", "classify"]
    hash_prefix = runlog.text_hash(FakeTemplate.source_text)[:6]
    assert len(runlog.list_runs(db, template=hash_prefix)) == 2


def test_search_fts_and_like(home):
    with runlog.open_run("generate") as log:
        log.item(0, "Where is Ganymede?", output="A moon of Jupiter.")
        log.item(1, "Translate: good morning", output="bonjour")
    db = runlog.connect()
    assert [i["idx"] for i in runlog.search(db, "jupiter")] == [0]
    assert [i["idx"] for i in runlog.search(db, 'morning "good')] == [1]  # quotes are matched, not parsed
    db.execute("DROP TABLE items_fts")  # as on an SQLite without FTS5: LIKE
    assert [i["idx"] for i in runlog.search(db, "Jupit")] == [0]


def test_rm_deletes_items_and_index(home):
    with runlog.open_run("generate") as log:
        log.item(0, "alpha", output="beta")
    db = runlog.connect()
    runlog.delete(db, log.id)
    assert runlog.list_runs(db) == [] and runlog.search(db, "alpha") == []
    with pytest.raises(DataError, match=f"no run {log.id}"):
        runlog.get_run(db, log.id)


def test_v1_database_upgrades(home):
    db = runlog.connect(upto=1)  # a database written by the first schema
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.execute("INSERT INTO runs (command, status, created) VALUES ('generate', 'complete', 1)")
    db.execute("INSERT INTO items (run_id, idx, key, prompt, output, created) VALUES (1, 0, 'index:0', 'old prompt', "
               "'old output', 1)")
    db.close()
    db = runlog.connect()
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(runlog.MIGRATIONS)
    assert [i["prompt"] for i in runlog.search(db, "old output")] == ["old prompt"]  # indexed on upgrade


def test_newer_database_is_refused(home):
    runlog.connect().execute("PRAGMA user_version = 99")
    with pytest.raises(DataError, match="newer than this llmlab"):
        runlog.connect()


def test_unwritable_home_names_the_fix(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLMLAB_HOME", str(blocker / "sub"))
    with pytest.raises(DataError, match="set LLMLAB_HOME to a writable folder or turn logging off"):
        runlog.open_run("generate")


WRITER = textwrap.dedent("""
    import sys, time
    from llmlab.runs import runlog
    n, pause = int(sys.argv[1]), float(sys.argv[2])
    with runlog.open_run("generate", ["writer"]) as log:
        for i in range(n):
            log.item(i, f"prompt {i}", output=f"output {i}")
            print(i, flush=True)
            time.sleep(pause)
""")


def _writer(home, n, pause):
    env = {**os.environ, "LLMLAB_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(n), str(pause)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_write_at_once(home):
    runlog.connect().close()
    procs = [_writer(home, 60, 0.001) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    runs = runlog.list_runs(runlog.connect())
    assert [(r["status"], r["n_items"]) for r in runs] == [("complete", 60), ("complete", 60)]


def _wait_for_items(proc, count):
    for _ in range(count):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()


def test_killed_run_keeps_every_finished_item(home):
    proc = _writer(home, 1000, 0.01)
    _wait_for_items(proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    db = runlog.connect()
    [run] = runlog.list_runs(db)
    items = runlog.items(db, run["id"])
    assert run["status"] == "partial" and run["finished"] is None
    assert len(items) >= 5 and [i["idx"] for i in items] == list(range(len(items)))
    assert run["n_items"] == len(items)


def test_sigterm_marks_the_run_interrupted(home):
    proc = _writer(home, 1000, 0.01)
    _wait_for_items(proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    [run] = runlog.list_runs(runlog.connect())
    assert run["status"] == "interrupted" and run["n_items"] >= 3


def test_wal_mode(home):
    runlog.connect().close()
    db = sqlite3.connect(home / "runs.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_eval_combo_logs_each_seed(home):
    combo_result = {"template": "sentiment", "task": "classify", "shots": 1, "calibrate": False, "seeds": [0, 1],
                    "runs": [{"seed": s, "metrics": {"accuracy": a}, "items": 4, "seconds": 0.5}
                             for s, a in [(0, 0.25), (1, 0.75)]]}
    with runlog.open_run("eval") as log:
        log.eval_combo(combo_result)
    results = runlog.get_run(runlog.connect(), log.id)["metrics"]["results"]
    assert [(r["seed"], r["shots"], r["metrics"]["accuracy"], r["items"]) for r in results] == [
        (0, 1, 0.25, 4), (1, 1, 0.75, 4)]


def _break_mid_run(log):
    log.item(0, "p0", output="o0")
    log.db.execute("DROP TABLE items")  # the log breaks mid-run
    log.item(1, "p1", output="o1")
    log.item(2, "p2", output="o2")


def test_a_failing_log_warns_once_and_the_run_goes_on(home, capsys):
    warnings = []
    with runlog.open_run("generate", on_warn=warnings.append) as log:
        _break_mid_run(log)
    assert warnings == [f"run log {home / 'runs.db'}: no such table: items; run {log.id} is logged only up to here"]
    assert log.broken
    assert capsys.readouterr().err == ""  # library code never prints: the warning went to on_warn


def test_the_cli_hooks_show_a_failing_log_on_stderr(home, capsys):
    from llmlab.commands.app import hooks

    with hooks().open_run("generate") as log:
        _break_mid_run(log)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"run {log.id} is logged only up to here" in err


def test_an_interrupt_between_begin_and_commit_still_ends_the_run(home):
    # SIGTERM or Ctrl-C can land after a write's BEGIN and before its COMMIT; the run must still be
    # marked (here: interrupted), with the items committed before it, and no second error.
    with pytest.raises(KeyboardInterrupt):
        with runlog.open_run("classify", ["llmlab"], {}) as log:
            log.item(0, "p", prediction="pos")
            log.db.execute("BEGIN IMMEDIATE")  # a write cut short: its transaction is still open
            log.db.execute("UPDATE runs SET n_items = 99 WHERE id = ?", (log.id,))
            raise KeyboardInterrupt
    run = runlog.get_run(runlog.connect(), log.id)
    assert (run["status"], run["n_items"]) == ("interrupted", 1)
    assert not log.broken


def test_versions_come_from_dist_info_folders_as_importlib_metadata_gives_them(tmp_path, monkeypatch):
    import importlib.metadata as md

    for name, version in runlog.versions().items():
        if name not in ("llmlab", "python"):
            assert version == md.version(name)
    code = "import sys\nfrom llmlab.runs import runlog\nrunlog.versions()\nprint('importlib.metadata' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, names in ((first, ["Torch-1.0.dist-info", "rouge_score-0.2.egg-info"]),
                          (second, ["torch-2.0.dist-info", "rouge_score-0.3.dist-info", "tokenizers-0.1.dist-info"])):
        for name in names:
            (folder / name).mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "none"), str(first), str(second)])
    # the first install on the path wins; an .egg-info first is left to importlib.metadata
    assert runlog._dist_info_versions(["torch", "rouge-score", "tokenizers", "nope"]) == {"torch": "1.0",
                                                                                         "tokenizers": "0.1"}
