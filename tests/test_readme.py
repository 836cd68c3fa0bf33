"""Every shell command shown in README.md and prompts/README.md runs: each fenced ```sh line is
extracted, its data files are swapped for tiny ones written here, a tiny model is added where the
command takes -m (or the embedded smollm2 for the few listed), and it must exit 0. So the README can
never drift from the code."""

import json
import re

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmlab.commands.cli import app

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "prompts" / "README.md"]

# Commands that can't run inside the test suite, each with the reason. Keep this short.
CANNOT_RUN = {
    "make demo": "builds .venv and installs torch from PyPI (minutes, network); its three llmlab commands "
                 "are the qa and sentiment commands run below",
    "make test": "runs this very test suite",
}
# Run as written on the real embedded model (no -m added), to check the answer is right.
REAL_SMOLLM2 = {'llmlab generate -t qa "Where is Ganymede located in the solar system?" --shots 2': "Jupiter"}

SHARED = {  # the shared data sets -> tiny files with the same fields
    "../shared/data/sst2/sst2.validation.jsonl": "sst2.jsonl",
    "../shared/data/sst2/sst2.train.jsonl": "sst2-train.jsonl",
    "../shared/data/ag_news/ag_news.test.jsonl": "ag_news.jsonl",
    "../shared/data/dialogsum/dialogsum.test.jsonl": "dialogsum.jsonl",
}
TAKES_MODEL = ("generate", "classify", "eval", "optimize", "render", "tokenize", "next", "lab", "tune", "serve")
SERVER_URL = "http://127.0.0.1:8000"  # the README's server: a tiny model's, on a free port, for the commands using it
# Shared model files -> the tiny T5 (tests pass without ../shared): a tokenizer folder, a config file.
T5_FILES = ("../shared/data/t5-tokenizer", "../shared/data/flan-t5-config/flan-t5-base.config.json")


def readme_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every line of every ```sh block (comments dropped)."""
    found = []
    for path in READMES:
        if not path.exists():
            continue
        inside = False
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("```"):
                inside = line.strip() in ("```sh", "```bash", "```shell") and not inside
                continue
            text = line.split(" #")[0].strip() if inside else ""
            if text and not text.startswith("#"):
                found.append((f"{path.relative_to(ROOT)}:{n}", text))
    return found


def evals_before(where: str) -> list[str]:
    """The `llmlab eval` commands above `where` in its ```sh block: what a `runs` or `report` command
    there reads from the run log (each test has its own empty log)."""
    path, line = where.rsplit(":", 1)
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()[: int(line) - 1]
    start = max(n for n, text in enumerate(lines) if text.strip().startswith("```"))
    return [c for w, c in COMMANDS if w.startswith(path + ":") and start < int(w.rsplit(":", 1)[1]) - 1
            and int(w.rsplit(":", 1)[1]) < int(line) and c.startswith("llmlab eval ")]


def write_data(folder: Path) -> None:
    rows = lambda items: "".join(json.dumps(r) + "\n" for r in items)  # noqa: E731
    (folder / "sst2.jsonl").write_text(rows(
        [{"text": t, "label": l} for t, l in [("a charming film", "positive"), ("bleak and dull", "negative"),
                                               ("loved it", "positive")]]))
    (folder / "sst2-train.jsonl").write_text(rows(  # enough rows for optimize to split
        [{"text": f"{w} film {n}", "label": "positive" if w == "fine" else "negative"}
         for n, w in enumerate(["fine", "dull"] * 6)]))
    (folder / "ag_news.jsonl").write_text(rows(
        [{"text": t, "label": l} for t, l in [("the match ended 2-1", "Sports"), ("stocks fell", "Business"),
                                               ("a new chip", "Sci/Tech"), ("talks in Geneva", "World")]]))
    (folder / "dialogsum.jsonl").write_text(rows(
        [{"id": f"d{n}", "dialogue": f"#Person1#: hello {n}\n#Person2#: hi", "summary1": "they greet",
          "summary2": "a greeting", "summary3": "hello"} for n in range(3)]))
    # Nothing else: every other file a README command reads is shipped (prompts/, prompts/examples/).


def prepare(command: str, model: str | None) -> tuple[list[str], str | None, str | None]:
    """(llmlab arguments, stdin, file for stdout) with data and model swapped in."""
    stdin = None
    if "|" in command:
        left, command = (part.strip() for part in command.split("|", 1))
        assert left.startswith(("echo ", "printf ")), f"unsupported pipe in {command!r}"
        words = shlex.split(left)
        # printf FORMAT: its \n escapes are line ends; echo TEXT: one line
        stdin = words[1].replace("\\n", "\n") if words[0] == "printf" else " ".join(words[1:]) + "\n"
    redirect = None
    if " > " in command:
        command, redirect = (part.strip() for part in command.split(" > ", 1))
    for real, tiny in SHARED.items():
        command = command.replace(real, tiny)
    args = shlex.split(command)
    assert args[0] == "llmlab", f"not an llmlab command: {command!r}"
    # a file of the repository named from its root (where the README's commands run): the test runs elsewhere
    args = [str(ROOT / a) if a.startswith("prompts/") and (ROOT / a).is_file() else a for a in args[1:]]
    if "--sample" in args:  # a sample of the real data set: as many rows as the tiny file has at most
        args[args.index("--sample") + 1] = "2"
    if model is not None and any(word in args[:2] for word in TAKES_MODEL):
        if "-m" in args:
            args[args.index("-m") + 1] = model
        else:
            args += ["-m", model]
    return args, stdin, redirect


def run(args, stdin, redirect) -> None:
    result = CliRunner().invoke(app, args, input=stdin, catch_exceptions=False)
    assert result.exit_code == 0, f"llmlab {' '.join(args)}: {result.stderr}"
    if redirect:
        Path(redirect).write_text(result.stdout)
    return result


COMMANDS = readme_commands()


def test_the_readmes_have_commands():
    assert len(COMMANDS) > 20
    listed = {c for _, c in COMMANDS if c.startswith("make ")}
    assert listed <= set(CANNOT_RUN), f"make targets not accounted for: {listed - set(CANNOT_RUN)}"


@pytest.mark.parametrize("where, command", [c for c in COMMANDS if not c[1].startswith("make ")],
                         ids=[w for w, c in COMMANDS if not c.startswith("make ")])
def test_readme_command_runs(tiny_models, tmp_path, monkeypatch, where, command):
    if command in REAL_SMOLLM2:
        pytest.skip("runs on the real smollm2 in test_readme_smollm2_commands")
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    # Commands that need an earlier command's output (rendered.jsonl) find it: run those first.
    for _, earlier in COMMANDS:
        if "> rendered.jsonl" in earlier and "rendered.jsonl" in command and earlier != command:
            run(*prepare(earlier, str(tiny_models["llama"])))
    if "--adapter" in command:  # an adapter folder: the README's tune commands write it first
        for _, earlier in COMMANDS:
            out = earlier.split(" -o ")[-1].split()[0] if earlier.startswith("llmlab tune ") else None
            if out and (out in command or out.split("/")[0] in command.split()):
                run(*prepare(earlier, str(tiny_models["llama"])))
    if command.startswith(("llmlab runs ", "llmlab report ")):
        for earlier in evals_before(where):
            run(*prepare(earlier, str(tiny_models["llama"])))
    if "--resume" in command:
        Path("out.jsonl").write_text("")
    t5 = tiny_models["t5"]
    command = command.replace(T5_FILES[1], str(t5 / "config.json")).replace(T5_FILES[0], str(t5))
    model = str(t5 if "flan-t5" in command or str(t5) in command else tiny_models["llama"])
    if command.startswith("llmlab serve") or SERVER_URL in command:
        serve_command(command, model, monkeypatch)
    else:
        run(*prepare(command, model))


def serve_command(command: str, model: str, monkeypatch) -> None:
    """`llmlab serve ... &` loads the model and builds the app, then returns instead of listening;
    a command with --server talks to a real server on the same tiny model."""
    pytest.importorskip("fastapi")
    from llmlab.backends import models
    from llmlab.serving import server
    from test_serve import running

    if command.startswith("llmlab serve"):
        class NoSocket:
            started, should_exit = False, True

            def run(self) -> None:
                pass

        monkeypatch.setattr(server, "uvicorn_server", lambda app, host, port: NoSocket())
        run(*prepare(command.removesuffix("&").strip(), model))
        return
    with running(models.load(model, "cpu", "float32")) as (url, _):
        run(*prepare(command.replace(SERVER_URL, url), model))


def test_readme_smollm2_commands(smollm2_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CACHE", str(smollm2_cache))
    monkeypatch.chdir(tmp_path)
    for command, answer in REAL_SMOLLM2.items():
        assert command in [c for _, c in COMMANDS], f"not in the README any more: {command}"
        result = run(*prepare(command, None))
        assert answer in result.stdout, result.stdout


OUTPUT_FLAGS = ("-o", "--output", "--report", "--html", ">")
FILE_SUFFIXES = (".jsonl", ".csv", ".yaml", ".yml", ".txt", ".json")


def test_readme_commands_read_only_shipped_files():
    """A fresh clone can run every command: each file a command reads is in the repository, is the
    shared data sets' (mapped to tiny files here), or is written by a command before it."""
    written, missing = set(), []
    for where, command in COMMANDS:
        words = shlex.split(command.split("|")[-1])
        for n, word in enumerate(words):
            path = word.split("=", 1)[-1]
            if not path.endswith(FILE_SUFFIXES):
                continue
            if n and words[n - 1] in OUTPUT_FLAGS:
                written.add(path)
            elif not (path.startswith("../shared/") or path in written or (ROOT / path).is_file()):
                missing.append(f"{where}: {path}")
    assert missing == []


def test_readme_opens_with_five_shipped_minutes():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = text.split("\n## ")
    first = sections[1]
    assert first.startswith("First five minutes\n") and len(first.splitlines()) <= 30  # one screen
    commands = [c for w, c in COMMANDS if w.startswith("README.md:") and
                int(w.split(":")[1]) < len(sections[0].splitlines()) + len(first.splitlines()) + 2]
    assert commands[0] == "make demo" and len(commands) >= 5
    assert not [c for c in commands if "../shared" in c]  # shipped files only
    assert "Q4_1" in first and "float32" in first and "517 MB" in first  # what the embedded model is
    assert "it takes minutes" in text  # the suite's duration, said before anyone runs it
    assert not re.search(r"\bissues?\b|#\d|this session|first landing", text, re.I)  # stands alone
