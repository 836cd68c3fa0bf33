"""Signals and concurrent writers against a REAL llmlab process (python -m llmlab, tiny models).

A batch run is started, and once records are on disk it gets SIGINT (Ctrl-C: exit 130), SIGTERM (handled
like Ctrl-C: exit 143) or SIGKILL (no clean-up at all). Every line left on disk must be a whole record;
`--resume` must then finish the run so that every input appears exactly once, equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import invoke
from llmlab.io import locks

ROOT = Path(__file__).resolve().parent.parent
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


def spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # inherited "ignore": give the child the default disposition, as a terminal's Ctrl-C would find it.
    return subprocess.Popen([sys.executable, "-m", "llmlab", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll every 10 ms until predicate() holds (True) or the process ends first (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.split("\n")[:-1]]  # each line one whole JSON record


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Inputs and uninterrupted results for both commands (computed in-process, once)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("signals")
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    words = "the movie film was great terrible boring loved it charming story moon Jupiter".split()
    # prompts of one token length: no padding, no longest-first reordering, so any batching gives the
    # same completions as the uninterrupted run
    candidates = [f"{a} {b} {c}" for a in words for b in words for c in words]
    by_len: dict[int, list[str]] = {}
    for text in candidates:
        by_len.setdefault(len(tok(text)["input_ids"]), []).append(text)
    prompts = max(by_len.values(), key=len)[:12]
    (root / "gen.jsonl").write_text("".join(json.dumps({"id": f"g{i}", "prompt": p}) + "\n"
                                            for i, p in enumerate(prompts)))
    (root / "cls.jsonl").write_text("".join(json.dumps({"text": f"{candidates[i * 7 % len(candidates)]} {i}"}) + "\n"
                                            for i in range(192)))
    (root / "toy.yaml").write_text('task: classify\ninput: "Review: {text}\\nSentiment:"\ntarget: label\n'
                                   "labels: {pos: positive, neg: negative}\n")
    commands = {
        "generate": ["generate", "-m", str(tiny_models["llama"]), "-i", str(root / "gen.jsonl"),
                     "--max-new-tokens", "24", "--batch-size", "2"],
        "classify": ["classify", "-m", str(tiny_models["llama"]), "-t", str(root / "toy.yaml"),
                     "-i", str(root / "cls.jsonl"), "--batch-size", "16"],
    }
    expected = {}
    for name, args in commands.items():
        out = root / f"{name}-full.jsonl"
        result = invoke(args + ["-o", out])
        assert result.exit_code == 0, result.stderr
        expected[name] = records(out)
    return commands, expected


def same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["index"] for r in got] == list(range(len(want)))  # every input exactly once, in order
    for g, w in zip(got, want):
        if "probabilities" in w:  # batch composition moves scores by float rounding only
            assert g["prediction"] == w["prediction"]
            assert all(abs(g["probabilities"][k] - v) < 1e-4 for k, v in w["probabilities"].items())
            g, w = {k: v for k, v in g.items() if "probabilities" not in k}, {k: v for k, v in w.items() if "probabilities" not in k}
        assert g == w


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
@pytest.mark.parametrize("command", ["classify", "generate"])
def test_interrupted_batch_run_resumes_to_the_full_result(runs, command, sig, tmp_path):
    commands, expected = runs
    args, want = commands[command] + ["-o", str(tmp_path / "out.jsonl")], expected[command]
    out = tmp_path / "out.jsonl"
    proc = spawn(args, tmp_path)
    try:
        started = wait_for(lambda: complete_lines(out) > 0, proc)
        seen = complete_lines(out)
        # the first records reach the disk while later batches still run, not all at the end
        assert started and proc.poll() is None and seen < len(want), f"no record on disk before the end ({seen})"
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
        stderr = proc.stderr.read()
    assert code == EXIT[sig], stderr
    assert "Traceback" not in stderr
    kept = records(out)
    # interrupted, not finished; what is on disk is whole records of the first inputs
    assert 0 < seen <= len(kept) < len(want)
    same_records(kept, want[: len(kept)])
    if sig != signal.SIGKILL:
        assert not locks.lock_path(str(out)).exists()  # a clean stop takes its lock file with it
        # one line says what is kept and how to finish
        assert f"interrupted: {len(kept)} of {len(want)} written to {out}; rerun the same command with --resume " \
               "to finish" in stderr, stderr
    resumed = invoke(commands[command] + ["-o", out, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    same_records(records(out), want)


def test_a_second_writer_fails_at_once_and_a_killed_writer_frees_the_file(runs, tmp_path):
    commands, expected = runs
    out = tmp_path / "out.jsonl"
    lock = locks.lock_path(str(out))
    proc = spawn(commands["classify"] + ["-o", str(out)], tmp_path)
    try:
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() != "", proc)
        for extra in ([], ["--resume"]):
            started = time.monotonic()
            second = invoke(commands["classify"] + ["-o", out, *extra])
            assert second.exit_code == 3
            assert second.stderr == (f"error: {out} is being written by another llmlab process (pid {proc.pid}); "
                                     "wait for it to finish, or write to a different --output\n")
            assert time.monotonic() - started < 5  # at once: no model load
        other = invoke(commands["generate"] + ["-o", tmp_path / "other.jsonl", "--max-new-tokens", "1"])
        assert other.exit_code == 0  # only that file is locked
        proc.kill()  # SIGKILL: no clean-up; the kernel drops the flock, the lock file stays behind
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stderr.close()
    assert lock.exists()
    resumed = invoke(commands["classify"] + ["-o", out, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    same_records(records(out), expected["classify"])
    assert not lock.exists()
