"""The progress bar tells the truth: it advances as work finishes, reaches the total, and its rate is
items done / wall time since the work started, never a burst rate from results that land together."""

import io
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from helpers import read_pty

from llmlab.core import console

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def frames(text: str) -> list[str]:
    """Each redraw of the bar, escape codes removed."""
    return [f.strip() for f in re.split(r"[\r\n]", ANSI.sub("", text)) if "/" in f]


def parse(frame: str) -> tuple[int, int, float | None]:
    done, total = map(int, re.search(r"(\d+)/(\d+)", frame).groups())
    rate = re.search(r"(\d[\d.]*) items/s", frame)
    return done, total, float(rate.group(1)) if rate else None


def test_rate_is_measured_over_wall_time_not_bursts():
    clock = [100.0]
    buffer = io.StringIO()
    term = Console(file=buffer, force_terminal=True, width=120)
    with console.progress(64, "classifying", console=term, get_time=lambda: clock[0]) as bar:
        clock[0] += 20.0
        bar.advance(32)  # a whole chunk lands at once after 20 s of work
        clock[0] += 0.0001
        bar.advance(32)  # ...and the next one a tenth of a millisecond later
    last = frames(buffer.getvalue())[-1]
    done, total, rate = parse(last)
    assert (done, total) == (64, 64)
    assert rate == 3.2  # 64 items / 20.0001 s, to three significant digits; never 77458 items/s


def test_rate_text_keeps_significant_digits():
    assert [console.rate_text(r) for r in (0.0423, 0.4, 3.14159, 42.42, 1234.5)] == ["0.0423", "0.4", "3.14", "42.4", "1234"]


def test_quiet_or_no_terminal_shows_nothing(capsys):
    console.configure(quiet=True)
    with console.progress(3, "x") as bar:
        bar.advance(3)
    console.configure(False, False)
    with console.progress(3, "x") as bar:  # pytest's stderr is not a terminal
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_real_terminal_bar_advances_monotonically_to_the_total(tiny_models, tmp_path):
    """classify on a pseudo-terminal, without -o: the bar climbs in steps, ends at the total, and
    never claims a rate above items / the command's whole wall time."""
    rows = [{"text": f"review number {n} was great", "label": "positive" if n % 2 else "negative"} for n in range(40)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", TERM="xterm")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "classify", "-t", "sentiment", "-m", str(tiny_models["llama"]),
                             "-i", str(data), "--batch-size", "2", "-f", "jsonl"],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(slave)
    captured = read_pty(master, proc)
    out = proc.stdout.read()
    proc.wait(timeout=60)
    wall = time.perf_counter() - started
    os.close(master)
    assert proc.returncode == 0, captured.decode(errors="replace")
    assert len(out.decode().splitlines()) == 40  # data on stdout, the bar on the terminal
    seen = [parse(f) for f in frames(captured.decode(errors="replace")) if "classifying" in f]
    counts = [done for done, _, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 40 and {t for _, t, _ in seen} == {40}
    assert len(set(counts)) >= 2  # it moved on the way, not only at the end
    # The rate shown can't exceed what was done over the time the command ran at all.
    assert all(rate is None or done / rate <= wall for done, _, rate in seen if rate)


def test_first_results_come_after_one_item_not_a_whole_chunk(fake_lm, tmp_path):
    """Chunks grow 1, 2, 4, ... up to the chunk size: the bar moves within the first forward pass."""
    from helpers import invoke

    from llmlab.scoring import classify

    assert classify.chunk_bounds(100, 32) == [(0, 1), (1, 3), (3, 7), (7, 15), (15, 31), (31, 63), (63, 95), (95, 100)]
    assert classify.chunk_bounds(3, 1) == [(0, 1), (1, 2), (2, 3)] and classify.chunk_bounds(0, 8) == []
    calls = []
    real = fake_lm.loglikelihood
    fake_lm.loglikelihood = lambda requests, *a, **k: calls.append(len(requests)) or real(requests, *a, **k)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {n}"}) + "\n" for n in range(40)))
    result = invoke(["classify", "-t", "sentiment", "-m", "fake", "-i", data, "--shots", "0", "--calibration", "off",
                     "--batch-size", "16", "-o", tmp_path / "out.jsonl"])
    assert result.exit_code == 0, result.stderr
    assert [n // 2 for n in calls] == [1, 2, 4, 8, 16, 9]  # items per pass (2 labels each), the bar advancing after each
