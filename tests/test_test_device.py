"""LLMLAB_TEST_DEVICE: the device the suite loads its models onto (helpers.py, conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import device_from_env


@pytest.mark.parametrize("raw, expected", [
    ("", ("cpu", None)), ("cpu", ("cpu", None)), ("CUDA", ("cuda", None)), ("cuda:1", ("cuda", None)),
    ("mps", ("mps", None)),
    ("meta", ("cpu", "LLMLAB_TEST_DEVICE='meta' is not a device the tests can use: "
                     "choose cpu (the default), cuda, cuda:N or mps")),
    ("gpu", ("cpu", "LLMLAB_TEST_DEVICE='gpu' is not a device the tests can use: "
                    "choose cpu (the default), cuda, cuda:N or mps")),
])
def test_device_from_env(monkeypatch, raw, expected):
    monkeypatch.setenv("LLMLAB_TEST_DEVICE", raw)
    assert device_from_env() == expected


def test_a_wrong_device_stops_pytest_with_one_line(tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, "LLMLAB_TEST_DEVICE": "meta"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_io.py")],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 4
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert lines == ["Exit: LLMLAB_TEST_DEVICE='meta' is not a device the tests can use: "
                     "choose cpu (the default), cuda, cuda:N or mps"]
