"""The run log as `generate`, `classify` and `eval` write it: real runs on tiny models, then
`llmlab runs list/compare` and `llmlab report` read what they logged. A killed eval keeps every item
it finished (partial); a terminated one is marked interrupted."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TEST_DEVICE, invoke, jsonl
from llmlab.runs import runlog
from test_classify import ITEMS, TEMPLATE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


def listed(*filters):
    result = invoke(["runs", "list", "--json", *filters])
    assert result.exit_code == 0, result.stderr
    return jsonl(result.stdout)


def logged_items(run_id):
    return runlog.items(runlog.connect(), run_id)


def test_classify_logs_each_record(tiny_models, toy, data, tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke(["classify", "-m", tiny_models["llama"], "-t", toy, "-i", data, "-o", out])
    assert result.exit_code == 0, result.stderr
    [run] = listed()
    assert (run["command"], run["status"], run["model"], run["templates"], run["items"]) == (
        "classify", "complete", str(tiny_models["llama"]), ["toy"], 5)
    records = jsonl(out.read_text())
    items = sorted(logged_items(run["id"]), key=lambda i: i["idx"])
    assert [(i["idx"], i["key"], i["prediction"], i["gold"]) for i in items] == [
        (r["index"], f"id:{r['id']}", r["prediction"], r["label"]) for r in records]
    for item, rec in zip(items, records):
        assert item["probabilities"] == pytest.approx(rec["probabilities"], abs=1e-6)
        assert item["prompt"].endswith(f"Review: {rec['text']}\nSentiment:")
        assert item["extra"]["input"] == {k: rec[k] for k in ("id", "text", "label")}
    stored = runlog.get_run(runlog.connect(), run["id"])
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert stored["metrics"] == {"items": 5, "labeled": 5, "accuracy": pytest.approx(accuracy)}
    assert stored["argv"][:2] == ["llmlab", "classify"] and stored["device"] == TEST_DEVICE
    assert stored["templates"][0]["text"] == TEMPLATE
    assert stored["templates"][0]["hash"] == runlog.text_hash(TEMPLATE)
    assert stored["versions"]["transformers"] and stored["config"]["method"] == "score"


def test_generate_logs_each_record(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{n}", "prompt": f"the movie was {n}"}) + "\n" for n in range(3)))
    out = tmp_path / "out.jsonl"
    result = invoke(["generate", "-m", tiny_models["llama"], "-i", prompts, "-o", out, "--max-new-tokens", 4])
    assert result.exit_code == 0, result.stderr
    [run] = listed("--command", "generate")
    assert (run["status"], run["model"], run["templates"], run["items"]) == ("complete", str(tiny_models["llama"]), [], 3)
    records = jsonl(out.read_text())
    items = sorted(logged_items(run["id"]), key=lambda i: i["idx"])
    assert [(i["idx"], i["key"], i["prompt"], i["output"]) for i in items] == [
        (r["index"], f"id:{r['id']}", r["prompt"], r["completion"]) for r in records]
    assert runlog.get_run(runlog.connect(), run["id"])["config"]["settings"]["max_new_tokens"] == 4


def test_single_generate_is_logged_too(tiny_models):
    result = invoke(["generate", "-m", tiny_models["llama"], "hello there", "--max-new-tokens", 3])
    assert result.exit_code == 0, result.stderr
    [run] = listed()
    [item] = logged_items(run["id"])
    assert (item["prompt"], item["output"] + "\n") == ("hello there", result.stdout)


@pytest.mark.parametrize("how", ["--no-log", "LLMLAB_LOG=0"])
def test_logging_off(tiny_models, toy, how):
    args = ["classify", "-m", tiny_models["llama"], "-t", toy, "great fun"]
    result = invoke(args + ["--no-log"] if how == "--no-log" else args, env={"LLMLAB_LOG": "0"} if "=" in how else None)
    assert result.exit_code == 0, result.stderr
    assert not runlog.db_path().exists()  # not even created


def test_a_bad_log_location_fails_before_the_model_loads(tmp_path, toy, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "file" / "home"))
    # The model doesn't exist either: the log error comes first, so no model time was spent.
    result = invoke(["classify", "-m", tmp_path / "no-such-model", "-t", toy, "great fun"])
    assert result.exit_code != 0 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "cannot open the run log" in line and "--no-log" in line


def eval_table(stdout):
    """(shots, calibration method) -> (accuracy %, macro-F1 %) as the table prints them."""
    rows = {}
    for line in stdout.splitlines()[2:]:
        cells = line.split()
        if len(cells) > 8 and cells[2].isdigit():
            rows[(int(cells[2]), cells[3])] = (cells[6], cells[7])
    return rows


def logged_table(run_id):
    """The same numbers from the run log's metrics: the mean over seeds, formatted as the table."""
    results = runlog.get_run(runlog.connect(), run_id)["metrics"]["results"]
    found = {}
    for r in results:
        found.setdefault((r["shots"], r["calibrate"]), []).append(r["metrics"])
    mean = lambda ms, k: f"{100 * sum(m[k] for m in ms) / len(ms):.1f}"  # noqa: E731
    return {k: (mean(ms, "accuracy"), mean(ms, "macro_f1")) for k, ms in found.items()}


@pytest.fixture
def two_evals(tiny_models, toy, data, tmp_path):
    """Two evals: the toy template, and one whose verbalizers are swapped (some predictions differ)."""
    other = tmp_path / "swapped.yaml"
    other.write_text(TEMPLATE.replace("name: toy", "name: swapped").replace("pos: positive", "pos: P1")
                     .replace("neg: Negative words", "neg: positive"))
    printed = []
    for tmpl in (toy, other):
        result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--shots", "0,2",
                         "--seeds", 2, "--calibration", "both"])
        assert result.exit_code == 0, result.stderr
        printed.append(result.stdout)
    runs = listed("--command", "eval")
    return [r["id"] for r in reversed(runs)], printed


def test_eval_logs_items_and_the_printed_metrics(two_evals, data):
    (a, b), printed = two_evals
    run = runlog.get_run(runlog.connect(), a)
    assert (run["status"], run["n_items"], [t["name"] for t in run["templates"]]) == ("complete", 30, ["toy"])
    assert eval_table(printed[0]) == logged_table(a) and len(logged_table(a)) == 4
    items = logged_items(a)
    combos = sorted({i["combo"] for i in items})
    assert combos == ["shots=0 seed=0", "shots=0 seed=0 calibrated", "shots=2 seed=0", "shots=2 seed=0 calibrated",
                      "shots=2 seed=1", "shots=2 seed=1 calibrated"]
    # Each combination's logged predictions give its logged accuracy.
    for r in run["metrics"]["results"]:
        mine = [i for i in items if i["combo"] == runlog.combo(r["shots"], r["seed"], r["calibrate"])]
        assert [i["key"] for i in mine] == [f"id:{row['id']}" for row in ITEMS]
        right = sum(i["prediction"] == i["gold"] for i in mine) / len(mine)
        assert r["metrics"]["accuracy"] == pytest.approx(right) and r["items"] == 5


def test_runs_compare_and_report_on_two_evals(two_evals, tmp_path):
    (a, b), _ = two_evals
    result = invoke(["runs", "compare", a, b, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    shown = {(r["combo"], r["key"]) for r in jsonl(result.stdout) if not r.get("summary")}
    preds = {}
    for run_id in (a, b):
        for i in logged_items(run_id):
            preds.setdefault((i["combo"], i["key"]), set()).add(i["prediction"])
    differing = {k for k, v in preds.items() if len(v) > 1}
    assert shown == differing and 0 < len(differing) < len(preds)
    page = tmp_path / "r.html"
    result = invoke(["report", a, b, "-o", page])
    assert result.exit_code == 0, result.stderr
    text = page.read_text()
    assert 'class="curve"' in text and "<polyline" in text  # the shot-sweep curve
    assert text.count('<figure class="confusion">') == 8  # 2 runs x 2 shot counts x calibrated or not
    assert 'id="matrix"' in text


# ---------------------------------------------------------------- stopped runs, in a real process


@pytest.fixture
def many(tmp_path):
    """Enough inputs that an eval is still running when it is stopped."""
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"m{n}", "text": f"review number {n}", "label": "pos" if n % 2 else "neg"})
                            + "\n" for n in range(400)))
    return path


def stop_eval(tiny_models, toy, many, tmp_path, sig):
    """Start `llmlab eval` in a process, wait until it has logged some items, send `sig`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMLAB_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "eval", "-m", str(tiny_models["llama"]), "-t", str(toy),
                             "--data", str(many), "--shots", "0,1", "--seeds", "2", "--batch-size", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = tmp_path / "home" / "runs.db"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                reader = sqlite3.connect(db)
                try:
                    row = reader.execute("SELECT n_items FROM runs").fetchone()
                except sqlite3.OperationalError:  # the log is being created
                    row = None
                finally:
                    reader.close()
                if row and row[0] >= 6:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the eval ended before it could be stopped: {proc.communicate()[1][-500:]}"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


@pytest.mark.parametrize("sig, status, code", [(signal.SIGKILL, "partial", -9), (signal.SIGTERM, "interrupted", 143)])
def test_a_stopped_eval_keeps_every_finished_item(tiny_models, toy, many, tmp_path, monkeypatch, sig, status, code):
    proc = stop_eval(tiny_models, toy, many, tmp_path, sig)
    assert proc.returncode == code
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "home"))
    [run] = listed()
    items = logged_items(run["id"])
    assert run["status"] == status and run["items"] == len(items) >= 6
    # Stopped early in the first combination (zero shots): items 0..n-1, each as `classify` scores it.
    assert {i["combo"] for i in items} == {"shots=0 seed=0"}
    assert [i["idx"] for i in items] == list(range(len(items)))
    out = tmp_path / "out.jsonl"
    result = invoke(["classify", "-m", tiny_models["llama"], "-t", toy, "-i", many, "--limit", len(items), "-o", out,
                     "--no-log"])
    assert result.exit_code == 0, result.stderr
    records = jsonl(out.read_text())
    assert [(i["key"], i["prediction"]) for i in items] == [(f"id:{r['id']}", r["prediction"]) for r in records]
    for item, rec in zip(items, records):
        assert item["probabilities"] == pytest.approx(rec["probabilities"], abs=1e-6)
