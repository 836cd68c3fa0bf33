"""Data-parallel eval (llmlab.orchestration.parallel): 2 CPU processes over gloo give the same report metrics
and per-item predictions as 1 process; only process 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke
from llmlab.orchestration import parallel

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "obvious_reviews.jsonl"  # 12 labeled reviews


def _eval(model: Path, report: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    args = [sys.executable, "-m", "llmlab", "eval", "-t", "sentiment", "--data", str(DATA), "--model", str(model),
            "--dtype", "float32", "--shots", "0,2", "--calibration", "both", "--limit", "11", "--log-samples",
            "--report", str(report), "-q", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _comparable(report: dict) -> list:
    """What must not depend on the process count: every run's metrics and per-item records
    (probabilities apart: see _probabilities)."""
    return [(r["template"], r["shots"], r["calibrate"], run["metrics"],
             [{k: v for k, v in s.items() if k != "probabilities"} for s in run["samples"]])
            for r in report["results"] for run in r["runs"]]


def _probabilities(report: dict) -> list[float]:
    """Every label probability of every item. A process's batches hold other rows (padded to other
    widths) than one process's, and the matrix products round differently in the last bits, so
    the rounded probabilities may differ by a few units in the 6th decimal."""
    return [p for r in report["results"] for run in r["runs"] for s in run["samples"]
            for p in s["probabilities"].values()]


def test_two_processes_give_the_one_process_report(tiny_models, tmp_path):
    one = _eval(tiny_models["llama"], tmp_path / "one.json")
    two = _eval(tiny_models["llama"], tmp_path / "two.json", "--processes", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert _comparable(second) == _comparable(first)
    assert _probabilities(second) == pytest.approx(_probabilities(first), abs=5e-6)
    assert [s["index"] for s in second["results"][0]["runs"][0]["samples"]] == list(range(11))  # input order
    assert _table(two.stdout) == _table(one.stdout)  # one table, from process 0 only


def _table(out: str) -> list[str]:
    """The eval table without its last column (items/s, which depends on the process count)."""
    return [line.rsplit(None, 1)[0] if line.startswith("sentiment") else line for line in out.splitlines()]


def test_share_and_gather_alone_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert parallel.share(list("abcde")) == list("abcde")
    assert parallel.gather(list("abcde"), 5) == list("abcde")
    assert parallel.slowest(1.5) == 1.5


@pytest.mark.parametrize("rank, mine, count", [(0, ["a", "c", "e"], 3), (1, ["b", "d"], 2)])
def test_each_process_takes_every_nth_item(monkeypatch, rank, mine, count):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    assert parallel.share(list("abcde")) == mine
    assert parallel.share_count(5) == count
    assert parallel.is_main() is (rank == 0)


def test_gather_restores_input_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(parallel, "_all_gather", lambda mine: [["a", "d", "g"], ["b", "e"], ["c", "f"]])
    assert parallel.gather([], 7) == list("abcdefg")


def test_launch_command_drops_processes_and_uses_torchrun():
    cmd = parallel.launch_command(["eval", "-t", "x", "--processes", "2", "--data", "d.jsonl", "--processes=3"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("-m", 3):] == ["-m", "llmlab", "eval", "-t", "x", "--data", "d.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--data", "-", "--processes", "2"], "error: --processes: each process reads the data itself, so give "
                                          "--data FILE, not stdin"),
    (["--data", str(DATA), "--processes", "0"], "error: invalid --processes 0: must be >= 1"),
    (["--data", str(DATA), "--processes", "2", "--device-map", "auto"],
     "error: --device-map spreads one model over all devices, so it can't run once per process; use "
     "--device-map or several processes, not both"),
])
def test_process_mistakes_before_any_model_time(args, message, monkeypatch):
    monkeypatch.setattr("llmlab.backends.models.load", lambda *a, **k: pytest.fail("no model may load"))
    monkeypatch.setattr(parallel, "launch", lambda *a: pytest.fail("nothing may launch"))
    result = invoke(["eval", "-t", "sentiment", *args], input=DATA.read_text())
    assert (result.exit_code, result.stderr.strip()) == (2, message)


def test_processes_relaunches_this_command_line(monkeypatch):
    """In-process (CliRunner) runs hand the launcher their own arguments, not the test runner's."""
    seen = []
    monkeypatch.setattr(parallel, "launch", lambda args, n, *rest: seen.append((list(args), n)) or 0)
    monkeypatch.setattr("llmlab.backends.models.load", lambda *a, **k: pytest.fail("the launcher loads, not this process"))
    args = ["eval", "-t", "sentiment", "--data", str(DATA), "--processes", "2", "-q"]
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    assert seen == [(args, 2)]


def test_a_failing_process_is_one_error_line(tiny_models, tmp_path):
    """A model that breaks while loading, in both processes: one error line, no torchrun report."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_text("not a safetensors file")
    result = _eval(broken, tmp_path / "r.json", "--processes", "2")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SafetensorError"), result.stderr
    assert not (tmp_path / "r.json").exists()
