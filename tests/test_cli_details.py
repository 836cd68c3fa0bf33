"""Small things a newcomer meets: what `prompt show` and `prompt list` print, a closed pipe, the
report's file mode, '1 shot', and --calibration's choices in --help."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke

ROOT = Path(__file__).resolve().parent.parent


def test_prompt_show_defaults_name_shots_and_calibration():
    result = invoke(["prompt", "show", "sentiment"])
    assert result.exit_code == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.split("\n\n")[0].splitlines())
    assert rows["defaults"].startswith("shots 4, calibrate probe, chat ")
    generate = dict(line.split(None, 1) for line in invoke(["prompt", "show", "qa"]).stdout.split("\n\n")[0].splitlines())
    assert generate["defaults"].startswith("shots 0, chat ") and "calibrate" not in generate["defaults"]


def test_prompt_list_is_in_name_order():
    result = invoke(["prompt", "list", "-f", "text"])
    assert result.exit_code == 0, result.stderr
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert names == sorted(names) and names.index("sentiment") < names.index("sentiment-terse")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["prompt", "list"], ["prompt", "show", "sentiment"], ["--help"]])
def test_a_closed_pipe_exits_0_quietly(args):
    """`llmlab prompt list | head -1`: the reader is gone before llmlab writes; no error, exit 0."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "llmlab", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_report_is_written_with_the_umask_mode(fake_lm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [("good", "positive"), ("bad", "negative")]))
    report = tmp_path / "report.json"
    old = os.umask(0o022)
    try:
        result = invoke(["eval", "-m", "fake", "-t", "sentiment", "--data", data, "--calibration", "off",
                         "--report", report, "--no-log"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(report.stat().st_mode) == 0o644  # like any other output, not -rw-------


def test_one_shot_is_singular(tiny_models):
    result = invoke(["prompt", "render", "sentiment", "--var", "text=a fine film", "-m", tiny_models["llama"],
                     "--shots", "1"])
    assert result.exit_code == 0, result.stderr
    assert "(1 shot)" in result.stderr and "shots)" not in result.stderr


def test_calibration_help_shows_its_choices(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke(["classify", "--help"])
    line = next(line for line in result.stdout.splitlines() if "Calibration method" in line)
    assert "[off|contextual|batch|domain|probe]" in line


def make_steps(target: str, rules: dict | None = None) -> list[str]:
    """The recipe lines `make TARGET` runs, its prerequisites' first (read from the Makefile)."""
    import re

    if rules is None:
        text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("$(VENV)", ".venv").replace("$(BIN)", ".venv/bin")
        rules = {m.group(1): (m.group(2).split(), [line.strip() for line in m.group(3).splitlines() if line.strip()])
                 for m in re.finditer(r"^([\w./-]+):([^=\n]*)\n((?:\t.*\n?)*)", text, re.M)}
    prereqs, recipe = rules[target]
    return [step for p in prereqs if p in rules for step in make_steps(p, rules)] + recipe


def test_make_demo_installs_the_runtime_only_and_make_test_the_test_extras():
    demo = " ".join(make_steps("demo"))
    assert "pip install -q -e ." in demo and "[test]" not in demo
    assert "pip install -q -e '.[test]'" in " ".join(make_steps("test"))
