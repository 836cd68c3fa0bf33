import json

import pytest

from helpers import invoke, jsonl

TEMPLATE = """\
name: toy
description: toy sentiment
task: classify
instruction: Label each review.
input: "Review: {text}\\nSentiment:"
target: label
labels:
  pos: Positive
  neg: Negative
examples:
  - {text: great fun, label: pos}
  - {text: so dull, label: neg}
  - {text: loved it, label: pos}
  - {text: awful mess, label: neg}
  - {text: a delight, label: pos}
"""


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TEMPLATE)
    return path


def render(model, *args, input=None):
    return invoke(["prompt", "render", *args, "-m", model, "--chat", "off"], input=input)


@pytest.mark.parametrize(
    "shots, expected",
    [
        (0, "Label each review.\n\nReview: what a film\nSentiment:\n"),
        (1, "Label each review.\n\nReview: great fun\nSentiment: Positive\n\nReview: what a film\nSentiment:\n"),
        (3, "Label each review.\n\nReview: great fun\nSentiment: Positive\n\nReview: so dull\nSentiment: Negative"
            "\n\nReview: loved it\nSentiment: Positive\n\nReview: what a film\nSentiment:\n"),
    ],
)
def test_exact_zero_one_few_shot_prompts(tiny_models, toy, shots, expected):
    result = render(tiny_models["llama"], toy, "--var", "text=what a film", "--shots", shots, "--shot-selection", "first")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected
    unit = "shot" if shots == 1 else "shots"
    assert result.stderr.startswith("--var: ") and result.stderr.endswith(f"tokens of 2048 ({shots} {unit})\n")


def shots_of(stdout):
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("Review: ") and "what a film" not in line]


def test_balanced_mixes_labels_and_is_the_default_for_classify(tiny_models, toy):
    result = render(tiny_models["llama"], toy, "--var", "text=what a film", "--shots", 4, "--seed", 3)
    labels = [line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith("Sentiment: ")]
    assert labels in (["Positive", "Negative"] * 2, ["Negative", "Positive"] * 2)


def test_random_selection_is_seeded(tiny_models, toy):
    draws = {seed: shots_of(render(tiny_models["llama"], toy, "--var", "text=x", "--shots", 3,
                                   "--shot-selection", "random", "--seed", seed).stdout) for seed in range(6)}
    assert draws[1] == shots_of(render(tiny_models["llama"], toy, "--var", "text=x", "--shots", 3,
                                       "--shot-selection", "random", "--seed", 1).stdout)
    assert len({tuple(d) for d in draws.values()}) > 1


def test_an_item_is_never_its_own_demonstration(tiny_models, tmp_path):
    data = tmp_path / "pool.jsonl"
    rows = [{"text": f"review number {i}", "label": "pos" if i % 2 else "neg"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmpl = tmp_path / "t.yaml"
    tmpl.write_text(TEMPLATE.split("examples:")[0] + "examples: pool.jsonl\n")
    result = render(tiny_models["llama"], tmpl, "-i", data, "--shots", 3, "--shot-selection", "first", "-f", "jsonl")
    for row in jsonl(result.stdout):
        own = f"Review: {row['text']}\nSentiment: "
        assert own not in row["prompt"] and row["prompt"].count("Sentiment: ") == 3


def test_chat_turns_and_inline(tiny_models, toy):
    base = ["prompt", "render", toy, "-m", tiny_models["llama-chat"], "--var", "text=what a film", "--shots", 1,
            "--shot-selection", "first"]
    turns = invoke(base + ["--shot-format", "turns"]).stdout
    inline = invoke(base + ["--shot-format", "inline"]).stdout
    assert turns == ("<|user|>Label each review.\n\nReview: great fun\nSentiment:</s><|assistant|>Positive</s>"
                     "<|user|>Review: what a film\nSentiment:</s><|assistant|>\n")
    assert inline == ("<|user|>Label each review.\n\nReview: great fun\nSentiment: Positive\n\n"
                      "Review: what a film\nSentiment:</s><|assistant|>\n")


def test_jsonl_render_holds_the_exact_prompt(tiny_models, toy, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n')
    rows = jsonl(invoke(["prompt", "render", toy, "-m", tiny_models["llama-chat"], "-i", data, "-f", "jsonl"]).stdout)
    assert [(r["id"], r["text"]) for r in rows] == [("a", "one"), ("b", "two")]
    assert rows[0]["prompt"] == "<|user|>Label each review.\n\nReview: one\nSentiment:</s><|assistant|>"


LONG = " ".join(["great fun"] * 40)


@pytest.mark.parametrize(
    "mode, length, code, stderr_has, stdout_has",
    [
        ("drop-shots", 40, 0, "dropped 3 of 3 shots (41 tokens now)", f"Review: {LONG[:40]}\nSentiment:"),
        ("truncate", 120, 0, "cut 'text' from the left", "Review:"),
        ("error", 120, 5, "error: --var: the prompt needs 132 tokens + 8 new, over the model's 64-token window", None),
    ],
)
def test_overflow_modes(tiny_models, toy, mode, length, code, stderr_has, stdout_has):
    # gpt2 has a 64-token window; 8 new tokens leave 56 for the prompt.
    shots = 0 if mode == "truncate" else 3  # truncate cuts the input, never the demonstrations
    result = render(tiny_models["gpt2"], toy, "--var", f"text={LONG[:length]}", "--shots", shots, "--overflow", mode,
                    "--max-new-tokens", 8, "--shot-selection", "first")
    assert result.exit_code == code, result.stderr
    assert stderr_has in result.stderr
    if stdout_has:
        assert stdout_has in result.stdout


def test_truncate_keeps_the_end_and_fits(tiny_models, toy):
    result = render(tiny_models["gpt2"], toy, "--var", f"text={LONG} THE END", "--overflow", "truncate",
                    "--max-new-tokens", 8, "-f", "jsonl")
    row = jsonl(result.stdout)[0]
    assert row["tokens"] <= 56 and row["prompt"].endswith("THE END\nSentiment:")
    assert result.stderr.startswith("warning: --var: prompt of ") and "from the left to its last" in result.stderr


@pytest.mark.parametrize(
    "body, args, error",
    [
        ("name: x\ninput: [oops\n", [], "line 3, column 1: invalid YAML"),
        (TEMPLATE, ["--var", "txt=hi"], "error: --var: no field 'text' for the template (fields: txt)"),
        (TEMPLATE.replace("label: neg}", "label: meh}", 1), [], "example 2 has label 'meh', not one of the template's labels: pos, neg"),
        (TEMPLATE, ["--shot-selection", "clever", "--shots", "1"], "error: Invalid value for '--shot-selection': 'clever' is not one of 'first', 'random', 'balanced', 'similar', 'similar-tfidf', 'similar-hidden'."),
        (TEMPLATE.split("examples:")[0], ["--shots", "2"], "has no examples, so --shots 2 has nothing to show"),
        (TEMPLATE.replace("task: classify", "task: translate"), [], "task must be generate or classify, not 'translate'"),
        (TEMPLATE.replace("name: toy", "name: toy\nsuffix: x"), [], "unknown key 'suffix'"),
        (TEMPLATE.replace("{text}", "{text!r}"), [], "bad placeholder"),
    ],
)
def test_bad_templates(fake_lm, tmp_path, body, args, error):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    result = render("fake", path, *(args if "--var" in args else [*args, "--var", "text=hi"]))
    assert result.exit_code != 0
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_template_name_lists_the_available():
    result = invoke(["prompt", "render", "nope", "--var", "x=1"])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no template named 'nope' (available: ")
    assert "sentiment" in result.stderr


SHIPPED = {
    "sentiment": {"text": "I loved this movie!"},
    "sentiment-terse": {"text": "I loved this movie!"},
    "sentiment-opt": {"text": "I loved this movie!"},
    "dialogue-summary": {"dialogue": "#Person1#: Hi.\n#Person2#: Hello."},
    "dialogue-summary-flan": {"dialogue": "#Person1#: Hi.\n#Person2#: Hello."},
    "entities": {"text": "Ana met Bo in Lima."},
    "qa": {"question": "Where is Ganymede located in the solar system?"},
    "translate-fr-en": {"fr": "Bonjour tout le monde."},
    "news-topic": {"text": "The striker scored twice."},
}


def test_list_shows_every_shipped_template():
    result = invoke(["prompt", "list", "-f", "text"])
    assert result.exit_code == 0
    assert sorted(line.split("\t")[0] for line in result.stdout.splitlines()) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_template_renders(tiny_models, name):
    values = [f"--var={k}={v}" for k, v in SHIPPED[name].items()]
    result = render(tiny_models["llama"], name, *values, "--shots", 2)
    assert result.exit_code == 0, result.stderr
    assert list(SHIPPED[name].values())[0] in result.stdout and "(2 shots)" in result.stderr


def test_prompts_dir_and_name_lookup(tiny_models, tmp_path, toy):
    result = invoke(["prompt", "list", "--prompts-dir", tmp_path, "-f", "text"])
    assert "toy\tclassify\ttoy sentiment" in result.stdout
    by_name = invoke(["prompt", "render", "toy", "--prompts-dir", tmp_path, "-m", tiny_models["llama"],
                      "--var", "text=hi", "--chat", "off"])
    assert by_name.stdout.endswith("Review: hi\nSentiment:\n")


def test_generate_uses_the_same_builder(tiny_models, toy, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one", "label": "pos"}\n{"text": "two", "label": "neg"}\n')
    rendered = jsonl(render(tiny_models["llama"], toy, "-i", data, "--shots", 2, "-f", "jsonl").stdout)
    assert len(rendered) == 2
    generated = jsonl(invoke(["generate", "-m", tiny_models["llama"], "-t", toy, "-i", data, "--shots", 2,
                              "--max-new-tokens", 2]).stdout)
    assert [g["prompt"] for g in generated] == [r["prompt"] for r in rendered]
    assert [g["prompt_tokens"] for g in generated] == [r["tokens"] for r in rendered]


T5_TOKENIZER = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "t5-tokenizer"


@pytest.mark.skipif(not (T5_TOKENIZER / "tokenizer.json").exists(), reason="needs ../shared/data/t5-tokenizer")
def test_flan_t5_window_with_the_real_t5_tokenizer(tmp_path):
    dialogue = "\n".join(f"#Person{1 + i % 2}#: line {i} of a long talk about trains, weather and lunch." for i in range(80))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"dialogue": dialogue}) + "\n")
    result = invoke(["prompt", "render", "dialogue-summary", "-i", data, "--shots", 2, "-m", T5_TOKENIZER, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert "did not fit the 512-token window; dropped 2 of 2 shots" in result.stderr
    row = jsonl(result.stdout)[0]
    assert row["tokens"] <= 512 and row["prompt"].endswith("Summary:")


# ---------------------------------------------------------------- discovery and template defaults


def test_a_broken_file_hides_no_other_template(tiny_models, tmp_path, toy):
    (tmp_path / "broken.yaml").write_text("name: broken\ninput: [oops\n")
    listed = invoke(["prompt", "list", "--prompts-dir", tmp_path, "-f", "text"])
    assert listed.exit_code == 0
    names = [line.split("\t")[0] for line in listed.stdout.splitlines()]
    assert "toy" in names and "sentiment" in names and "broken" not in names
    assert listed.stderr == f"warning: skipped template {tmp_path / 'broken.yaml'}: {tmp_path / 'broken.yaml'} line 3, column 1: invalid YAML (expected ',' or ']', but got '<stream end>')\n"
    by_name = invoke(["prompt", "render", "toy", "--prompts-dir", tmp_path, "-m", tiny_models["llama"],
                      "--var", "text=hi", "--chat", "off"])
    assert by_name.exit_code == 0 and by_name.stdout.endswith("Review: hi\nSentiment:\n")
    asked = invoke(["prompt", "render", "broken", "--prompts-dir", tmp_path, "--var", "text=hi"])
    assert asked.exit_code == 3 and "invalid YAML" in asked.stderr and len(asked.stderr.splitlines()) == 1


def test_a_template_name_given_inside_the_file_survives_a_broken_neighbour(tmp_path, toy):
    (tmp_path / "aaa.yaml").write_text("task: [\n")
    (tmp_path / "file-name.yaml").write_text(TEMPLATE.replace("name: toy", "name: inner-name"))
    from llmlab.prompting import prompts

    assert prompts.find_template("inner-name", [str(tmp_path)]).name == "inner-name"


@pytest.mark.parametrize(
    "keys, shots, calibrate",
    [("", 0, "off"), ("shots: 3\n", 3, "off"), ("calibrate: true\n", 0, "contextual"),
     ("calibrate: batch\n", 0, "batch"), ("shots: 0\ncalibrate: false\n", 0, "off")],
)
def test_template_defaults_for_shots_and_calibrate(tmp_path, keys, shots, calibrate):
    from llmlab.prompting import prompts

    path = tmp_path / "t.yaml"
    path.write_text(TEMPLATE + keys)
    template = prompts.load_template(str(path))
    from llmlab.orchestration import resolve

    assert resolve.shots(None, template) == resolve.Sourced(shots, "template" if "shots" in keys else "default")
    assert resolve.calibration(None, template).value == calibrate
    assert resolve.calibration(None, template).source == ("template" if "calibrate" in keys else "default")
    other = "domain" if calibrate == "off" else "off"
    assert resolve.shots(1, template) == resolve.Sourced(1, "flag")  # a flag always wins
    assert resolve.calibration(other, template) == resolve.Sourced(other, "flag")


@pytest.mark.parametrize(
    "body, error",
    [
        (TEMPLATE + "shots: -1\n", "'shots' must be a whole number >= 0, not '-1'"),
        (TEMPLATE + "shots: two\n", "'shots' must be a whole number >= 0, not 'two'"),
        (TEMPLATE + "calibrate: maybe\n", "'calibrate' must be off, contextual, batch, domain or probe, not 'maybe'"),
        (TEMPLATE + "calibrate: probe\n", "'calibrate: probe' needs 'probe', the labelled rows to fit it on"),
        (TEMPLATE + "probe: nowhere.jsonl\n", "probe file 'nowhere.jsonl' not found next to the template"),
        (TEMPLATE + "probe: [1, 2]\n", "'probe' must be the path of a JSONL/CSV file of labelled rows or of a "
         "fitted probe .npz (classify templates only)"),
        (TEMPLATE.replace("task: classify", "task: generate") + "calibrate: true\n", "'calibrate' applies to classify templates only"),
        (TEMPLATE.split("examples:")[0] + "shots: 2\n", "'shots: 2' needs 'examples' to draw demonstrations from"),
    ],
)
def test_bad_template_defaults(tmp_path, body, error):
    from llmlab.prompting import prompts
    from llmlab.core.errors import TemplateError

    path = tmp_path / "t.yaml"
    path.write_text(body)
    with pytest.raises(TemplateError, match="^" + __import__("re").escape(f"{path}: {error}") + "$"):
        prompts.load_template(str(path))


def test_render_uses_the_template_shots(tiny_models, tmp_path):
    (tmp_path / "toy.yaml").write_text(TEMPLATE + "shots: 2\n")
    result = invoke(["prompt", "render", "toy", "--prompts-dir", tmp_path, "-m", tiny_models["llama"], "--var", "text=x"])
    assert result.exit_code == 0 and result.stderr.endswith("(2 shots)\n")


def test_the_builder_warns_through_on_warn_and_never_prints(toy, capsys):
    from llmlab.prompting import prompts
    from llmlab.backends.fake import CharTokenizer
    from llmlab.io.records import Item

    template = prompts.load_template(str(toy))
    warnings = []
    prompts.make_builder(template, CharTokenizer(), 4096, prompts.options_for(template, shots=9),
                         on_warn=warnings.append)
    assert warnings == ["--shots 9, but template 'toy' has only 5 examples to show: using 5"]
    prompts.make_builder(template, CharTokenizer(), 4096, prompts.options_for(template, shots=9))
    assert capsys.readouterr().err == ""  # no on_warn: nothing is said, nothing printed
    small = prompts.make_builder(template, CharTokenizer(), 60, prompts.options_for(template, shots=2),
                                 on_warn=warnings.append)
    built = small.build(Item(0, {"text": "fine"}, "row 1"))
    assert built.notes and capsys.readouterr().err == ""  # dropped shots are notes, for the caller's on_warn
