"""llmlab lab: driven through a pseudo-terminal (keys in, screen out), as a piped script, and its mistakes (fast)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

from helpers import invoke, jsonl

pexpect = pytest.importorskip("pexpect")
pyte = pytest.importorskip("pyte")
ROOT = Path(__file__).resolve().parents[1]
UP = "\x1b[A"


class Terminal:
    """`llmlab lab` in a pty, its output fed to a terminal emulator so the test reads the screen."""

    def __init__(self, args, env):
        self.screen = pyte.Screen(120, 40)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(sys.executable, ["-m", "llmlab", "lab", *args], cwd=str(ROOT), env=env,
                                   dimensions=(40, 120), timeout=120)

    def wait_for(self, text, times=1):
        """Read output until `text` is on the screen `times` times."""
        while self.text().count(text) < times:
            try:
                self.stream.feed(self.child.read_nonblocking(4096, timeout=120))
            except pexpect.TIMEOUT:
                raise AssertionError(f"{text!r} not on the screen:\n{self.text()}") from None
        return self.text()

    def text(self):
        return "\n".join(line.rstrip() for line in self.screen.display)  # (so a bare prompt reads "lab>")

    def send(self, keys):
        self.child.send(keys)


@pytest.fixture
def env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMLAB_CACHE=str(tmp_path / "cache"), COLUMNS="120",
               HF_HUB_OFFLINE="1", PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    env.pop("LLMLAB_MODEL", None)
    return env


def test_lab_in_a_terminal(tiny_models, env, tmp_path):
    expected = jsonl(invoke(["generate", "-m", tiny_models["llama"], "the movie was", "--max-new-tokens", 4,
                             "-f", "jsonl"]).stdout)[0]["completion"]
    term = Terminal(["-m", str(tiny_models["llama"])], env)
    term.wait_for("lab>")
    term.send("/set max_new_tokens 4\r")
    term.wait_for("max_new_tokens = 4")
    term.send("the movie was\r")
    screen = term.wait_for("lab> the movie was\n" + expected.split("\n")[0] + "\nlab>")  # then a fresh prompt
    assert expected.strip() and screen.count("lab>") == 3
    term.send(UP + UP + "\r")  # arrow-key history: back to "/set max_new_tokens 4"
    term.wait_for("max_new_tokens = 4", times=2)
    term.send(UP + UP + "\r")  # and back to the prompt: the same greedy completion again
    term.wait_for("lab> the movie was\n" + expected.split("\n")[0], times=2)
    term.send("/show\r")
    term.wait_for("lab> /show\nthe movie was\nlab>")
    term.send("/set temperature 0.5\r")
    term.wait_for("temperature = 0.5 (sampling on)")
    preset = tmp_path / "preset.yaml"
    term.send(f"/save {preset}\r")
    term.wait_for("saved 10 settings")
    term.send("/nonsense\r")
    term.wait_for("error: unknown command /nonsense; /help lists them")
    term.send("/quit\r")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 0
    from llmlab.core import settings

    saved = settings.build(settings.load_preset(preset))
    assert (saved.max_new_tokens, saved.temperature, saved.do_sample) == (4, 0.5, True)
    history = (tmp_path / "cache" / "lab-history").read_text()
    assert "+the movie was" in history  # kept for the next session's arrow keys


def test_lab_script_from_stdin(tiny_models, tmp_path):
    single = invoke(["generate", "-m", tiny_models["t5"], "Review: great Sentiment:", "--max-new-tokens", 3])
    script = "\n".join([
        "/set max_new_tokens 3",
        "/template sentiment",
        "/shots 1",
        "great",
        "/show",
        "/tokens",
        "/next",
        "/template off",
        "Review: great Sentiment:",
        "/quit",
        "never run",
    ]) + "\n"
    result = invoke(["lab", "-m", tiny_models["t5"]], input=script)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Classify the sentiment of each movie review as Positive or Negative.\n\nReview:" in out  # /show
    assert "token budget (1 shot)" in out and "demonstration 1" in out  # /tokens with a template
    assert "step 1: next token after" in out  # /next
    assert result.stderr.splitlines()[:3] == ["max_new_tokens = 3", "template: sentiment", "shots: 1"]
    assert single.stdout.strip() and out.endswith(single.stdout)  # the plain prompt completes as generate does


def test_lab_shows_token_probabilities(tiny_models):
    """/set top_logprobs N: each completion as tokens with their probabilities and alternatives."""
    script = "/set max_new_tokens 3\n/set top_logprobs 2\nthe movie was\n/quit\n"
    result = invoke(["lab", "-m", tiny_models["llama"]], input=script)
    assert result.exit_code == 0, result.stderr
    single = invoke(["generate", "-m", tiny_models["llama"], "the movie was", "--max-new-tokens", 3,
                     "--top-logprobs", 2, "--format", "jsonl"])
    tokens = json.loads(single.stdout)["logprobs"]
    rows = [line.split("│")[2:4] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (repr(t["token"]), f"{100 * math.exp(t['logprob']):.1f}%") for t in tokens]
    assert "token colour = its probability under the model" in result.stdout


def test_lab_bad_setting_keeps_the_session(tiny_models):
    result = invoke(["lab", "-m", tiny_models["llama"]], input="/set top_p 7\n/set\n/quit\n")
    assert result.exit_code == 0
    assert "error: invalid --top-p 7.0: must be in (0, 1] (1 = no limit)" in result.stderr
    assert "top_p = 1.0" in result.stdout  # the bad value was not kept


def test_a_long_paste_while_a_completion_streams_arrives_whole(tiny_models, env, tmp_path):
    """The terminal is out of line mode for the session: the kernel's 4,095-character line limit no
    longer cuts a paste that arrives while the model is writing (issue 27)."""
    paste = " ".join(f"w{i}" for i in range(1800))  # ~10,000 characters on one line
    term = Terminal(["-m", str(tiny_models["llama"])], env)
    term.wait_for("lab>")
    term.send("/set max_new_tokens 200\r")
    term.wait_for("max_new_tokens = 200")
    term.send("the movie was\r")
    term.wait_for("lab> the movie was\n")  # the completion is streaming now
    term.send(paste + "\r")
    term.send("/quit\r")
    while True:
        try:
            term.stream.feed(term.child.read_nonblocking(65536, timeout=120))
        except pexpect.EOF:
            break
    term.child.close()
    history = (tmp_path / "cache" / "lab-history").read_text()
    entries = [line[1:] for line in history.splitlines() if line.startswith("+")]
    assert entries[-2:] == [paste, "/quit"]


@pytest.mark.parametrize("args, error, code", [
    (["--shots", "-1"], "error: invalid --shots -1: must be >= 0\n", 2),
    (["-t", "nosuch"], "error: no template named 'nosuch' (available: ", 3),
    (["--config", "nope.yaml"], "error: generation preset 'nope.yaml' not found", 3),
    (["--dtype", "int4"], "error: Invalid value for '--dtype': 'int4' is not one of", 2),
    (["--backend", "nope"], "error: Invalid value for '--backend': 'nope' is not one of", 2),
    (["--chat", "maybe"], "error: Invalid value for '--chat': 'maybe' is not one of", 2),
])
def test_lab_mistakes_before_loading(no_model, args, error, code):
    result = invoke(["lab", "-m", "./never-loaded", *args], input="")
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr


def test_lab_mistakes_in_the_session_keep_it(fake_lm):
    """Each mistaken line gets its own one-line error; the session goes on to the next line."""
    script = "/bogus\n/set top_p\n/set top_p 7\n/shots x\n/template\n/save\n/show\n/set\n/quit\n"
    result = invoke(["lab", "-m", "fake"], input=script)
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: unknown command /bogus; /help lists them",
        "error: /set top_p needs a value, e.g. /set temperature 0.7",
        "error: invalid --top-p 7.0: must be in (0, 1] (1 = no limit)",
        "error: /shots needs a whole number >= 0, not 'x'",
        "error: /template needs a name (llmlab prompt list) or off",
        "error: /save needs a file name, e.g. /save preset.yaml",
        "error: no prompt yet: type one first, or give the text after the command",
    ]
    assert "top_p = 1.0" in result.stdout  # the bad value was not kept
