"""The suite never touches the user's home: every fixture, including module- and session-scoped ones
that run llmlab before the per-test isolation, writes only under pytest's temporary folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIDE = re.compile(r'@pytest\.fixture\(scope="(module|session|package|class)"')


@pytest.mark.slow
def test_every_fixture_leaves_home_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # every test file with a fixture wider than one test (they run before the per-test isolation)
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py")
                   if p.name != Path(__file__).name and WIDE.search(p.read_text(encoding="utf-8")))
    assert "test_signals.py" in " ".join(files)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLMLAB_", "XDG_", "PYTEST_")) and k not in ("MPLCONFIGDIR", "HF_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    # --setup-only: every fixture of every test is set up and torn down, no test body runs
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--setup-only", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "base"), *files],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
