"""What a person at a terminal meets: classify tables with gold labels, --limit/--offset, render
summaries, the render -> generate round trip, `models`, `prompt show`, and mistakes caught early."""

import json

import pytest

from helpers import invoke, jsonl, read_only
from llmlab.core import console

REVIEWS = [{"id": f"r{n}", "text": t, "label": l} for n, (t, l) in enumerate(
    [("the movie was great", "positive"), ("the film was terrible and boring", "negative"),
     ("a charming story", "positive"), ("so dull", "negative"), ("loved it", "positive")])]


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    return path


def test_terminal_classify_shows_gold_mark_and_accuracy(tiny_models, reviews, monkeypatch):
    args = ["classify", "-t", "sentiment", "-m", tiny_models["llama"], "-i", reviews]
    records = jsonl(invoke(args + ["-f", "jsonl"]).stdout)
    monkeypatch.setattr(console, "stdout_is_terminal", lambda: True)
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "prediction" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")][:5] == ["#", "input", "gold", "ok", "prediction"]
    for r in records:
        row = next(line for line in lines if f"│ {r['index']}" in line.replace("│ ", "│ ", 1)[:6])
        assert ("✓" if r["correct"] else "✗") in row and r["label"] in row
    right = sum(r["correct"] for r in records)
    assert lines[-1] == f"accuracy {100 * right / 5:.1f}% ({right} of 5 labeled inputs)"


def test_limit_and_offset_keep_the_original_row_numbers(fake_lm, reviews):
    result = invoke(["classify", "-t", "sentiment", "-m", "fake", "-i", reviews, "--offset", 1,
                     "--limit", 2, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert [(r["index"], r["id"]) for r in jsonl(result.stdout)] == [(1, "r1"), (2, "r2")]


def test_render_then_generate_never_wraps_twice(tiny_models, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Where is Ganymede?"}\n{"question": "the movie was"}\n')
    model = tiny_models["llama-chat"]
    rendered = invoke(["prompt", "render", "qa", "-m", model, "-i", questions, "-f", "jsonl", "--shots", 1])
    assert rendered.exit_code == 0, rendered.stderr
    records = jsonl(rendered.stdout)
    assert all(r["templated"] is True and r["prompt"].startswith("<|user|>") for r in records)
    counts = sorted(r["tokens"] for r in records)
    assert rendered.stderr == (f"2 prompts: tokens min {counts[0]}, median {sum(counts) / 2:g}, max {counts[1]}; "
                               "window 256 (216 for the prompt), 0 over\n")
    out = invoke(["generate", "-m", model, "--input", "-", "--max-new-tokens", 2], input=rendered.stdout)
    assert out.exit_code == 0, out.stderr
    assert [r["prompt_tokens"] for r in jsonl(out.stdout)] == [r["tokens"] for r in records]
    verbose = invoke(["prompt", "render", "qa", "-m", model, "-i", questions, "-v"])
    assert verbose.stderr.splitlines()[0].startswith(f"{questions} line 1: ")


def test_plain_prompts_get_the_window_check(tiny_models):
    long = " ".join(["the movie was great"] * 40)  # far over tiny gpt2's 64-token window
    base = ["generate", "-m", tiny_models["gpt2"], "--max-new-tokens", 4, "-f", "jsonl"]
    refused = invoke(base + [long])
    assert refused.exit_code == 5 and refused.stdout == ""
    assert refused.stderr.startswith("error: the prompt: the prompt has ") and "over the model's 64-token window" in refused.stderr
    cut = invoke(base + ["--overflow", "truncate", long])
    assert cut.exit_code == 0, cut.stderr
    assert jsonl(cut.stdout)[0]["prompt_tokens"] <= 60 and "kept its last" in cut.stderr
    huge = invoke(base + ["x" * 100_000])
    assert huge.exit_code == 5 and "the prompt has 100,000 characters" in huge.stderr


@pytest.mark.parametrize("args, error, code", [
    (["-o", "{tmp}"], "error: --output '{tmp}' is a directory; give a file name inside it", 3),
    (["-o", "{tmp}/no/out.jsonl"], "error: --output '{tmp}/no/out.jsonl': folder '{tmp}/no' does not exist", 3),
    (["-o", "{tmp}/ro/out.jsonl"], "error: --output '{tmp}/ro/out.jsonl': folder '{tmp}/ro' is not writable", 3),
])
def test_output_paths_are_checked_before_the_model(tmp_path, args, error, code):
    (tmp_path / "ro").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    with read_only(tmp_path / "ro"):  # as root too
        for command in (["generate", "x"], ["classify", "-t", "sentiment", "x"]):
            result = invoke([*command, "-m", "./never-loaded", *args])
            assert result.exit_code == code and result.stderr.startswith(error.format(tmp=tmp_path)), result.stderr


def test_prompt_list_names_a_missing_folder():
    result = invoke(["prompt", "list", "--prompts-dir", "nosuchdir"])
    assert result.exit_code == 2
    assert result.stderr == "error: --prompts-dir 'nosuchdir' is not a folder; give a folder of template .yaml files\n"


@pytest.mark.parametrize("command", [["prompt", "show", ""], ["prompt", "render", ""], ["classify", "-t", "", "x"]])
def test_an_empty_template_name_is_an_unknown_template(command):
    result = invoke([*command, "-m", "./never-loaded"] if command[0] == "classify" else command)
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no template named '' (available: ") and result.stderr.count("\n") == 1


def test_prompt_show():
    result = invoke(["prompt", "show", "sentiment"])
    assert result.exit_code == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.split("\n\n")[0].splitlines())
    assert rows["name"] == "sentiment" and rows["task"] == "classify" and rows["fields"] == "text"
    assert rows["file"].endswith("prompts/sentiment.yaml") and rows["target"] == "label"
    assert rows["labels"] == "positive (Positive), negative (Negative)"
    assert rows["examples"].split()[0].isdigit() and "max_new_tokens" in rows["defaults"]
    assert result.stdout.rstrip("\n").endswith(open(rows["file"]).read().rstrip("\n"))


def test_models_lists_aliases_embedded_and_caches(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "c0ffee").write_bytes(b"x" * 2048)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").symlink_to("../../blobs/c0ffee")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke(["models", "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in jsonl(result.stdout)}
    assert rows["acme/tiny"]["kind"] == "hf-cache" and rows["acme/tiny"]["size"] == 2048
    assert rows["acme/tiny"]["offline"] is True
    assert rows["flan-t5-small"]["kind"] == "alias" and rows["flan-t5-small"]["where"] == "google/flan-t5-small"
    assert rows["smollm2"]["kind"] == "alias" and rows["smollm2"]["offline"] is True
