"""On a real terminal (a pty holding both stdout and stderr, rendered by pyte like a screen), log lines,
progress bars and answers each keep a line of their own: nothing is glued to a bar or a message."""

import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_pty

ROOT = Path(__file__).resolve().parent.parent
LLMLAB = f"{shlex.quote(sys.executable)} -m llmlab"
LABELS = ("positive", "negative")


def screen(command: str, env: dict | None = None, cwd: Path | None = None, columns: int = 120) -> tuple[int, list[str]]:
    """Run a shell command on a pseudo-terminal (stdout and stderr both); its exit status and the
    screen's non-blank lines as a 120-column terminal shows them."""
    import fcntl
    import struct
    import termios

    import pyte

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 200, columns, 0, 0))
    full = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS=str(columns), TERM="xterm", **(env or {}))
    proc = subprocess.Popen(["sh", "-c", command], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            env=full, cwd=cwd)
    os.close(slave)
    captured = read_pty(master, proc)
    proc.wait(timeout=120)
    os.close(master)
    term = pyte.Screen(columns, 200)
    pyte.ByteStream(term).feed(captured)
    return proc.returncode, [line.rstrip() for line in term.display if line.strip()]


def demo_lines(name: str = "demo") -> list[str]:
    """The classify lines of the Makefile's demo recipe, as the shell runs them (make's variables
    expanded, llmlab run from this checkout)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    review = re.search(r"^REVIEW := (.*)$", text, re.M).group(1)
    recipe = text.split(f"\n{name}:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [line.strip().lstrip("@").replace("$(BIN)/llmlab", LLMLAB).replace("$(REVIEW)", review).replace("$$", "$")
            for line in recipe if "llmlab classify" in line and "echo" not in line]


@pytest.mark.slow
def test_demo_classify_lines_are_clean_on_a_terminal(tiny_models, tmp_path):
    commands = demo_lines()
    assert len(commands) == 2
    code, lines = screen(" && ".join(commands), {"LLMLAB_MODEL": str(tiny_models["llama"]),
                                                 "LLMLAB_CACHE": os.environ["LLMLAB_CACHE"],
                                                 "LLMLAB_HOME": os.environ["LLMLAB_HOME"]}, tmp_path)
    assert code == 0, "\n".join(lines)
    answers = [line for line in lines if line.startswith("  zero-shot") or line.startswith("  template defaults")]
    assert len(answers) == 2, "\n".join(lines)
    for line in answers:  # "  zero-shot, uncalibrated:   positive": the label alone after the caption
        assert line.split(":", 1)[1].strip() in LABELS, line
    loaded = [line for line in lines if "loaded " in line]
    assert loaded and all(line.startswith("loaded ") for line in loaded), "\n".join(lines)
    bars = [line for line in lines if "━" in line]
    assert bars and all(line.startswith(("classifying ", "probe rows ")) for line in bars), "\n".join(lines)


@pytest.mark.slow
def test_answer_and_log_lines_never_glue_to_the_bar(tiny_models, tmp_path):
    """classify with stdout on the terminal: the answer is printed above the bar, on its own line."""
    code, lines = screen(f'{LLMLAB} classify -t sentiment "The jokes fall flat." --shots 0 --calibration off '
                         f'-f text -m {tiny_models["llama"]}', cwd=tmp_path)
    assert code == 0, "\n".join(lines)
    assert [line for line in lines if line in LABELS], "\n".join(lines)
    assert all(line.startswith("classifying ") for line in lines if "━" in line), "\n".join(lines)
    assert all(line.startswith("loaded ") for line in lines if "loaded " in line), "\n".join(lines)


@pytest.mark.slow
def test_compare_log_lines_stay_out_of_the_bar(tiny_models, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {n}", "label": LABELS[n % 2]}) + "\n" for n in range(4)))
    code, lines = screen(f"{LLMLAB} compare -i {data} -t sentiment -t sentiment-terse -m {tiny_models['llama']} "
                         f"-f jsonl --no-log > out.jsonl", cwd=tmp_path)
    assert code == 0, "\n".join(lines)
    assert any(line.startswith("loaded ") for line in lines), "\n".join(lines)
    for line in lines:
        assert not ("━" in line and "loaded" in line), "\n".join(lines)
        assert "━" not in line or line.startswith("comparing "), "\n".join(lines)


@pytest.mark.slow
def test_classify_to_a_file_ends_with_a_summary_on_the_terminal(tiny_models, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {n}", "label": LABELS[n % 2]}) + "\n" for n in range(5)))
    code, lines = screen(f"{LLMLAB} classify -t sentiment -i {data} --shots 0 --calibration off -m {tiny_models['llama']} "
                         "-o out.jsonl --no-log", cwd=tmp_path)
    assert code == 0, "\n".join(lines)
    right = sum(json.loads(line)["correct"] for line in (tmp_path / "out.jsonl").read_text().splitlines())
    assert lines[-1] == f"wrote 5 predictions to out.jsonl; accuracy {100 * right / 5:.1f}% on 5 labeled inputs"
