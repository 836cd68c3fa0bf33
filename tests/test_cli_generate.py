import json

import pytest

from helpers import invoke, jsonl

PROMPTS = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(
    ["the movie was", "Where is Ganymede?", "a", "the film was terrible and boring", "hello"])]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.mark.parametrize("kind", ["t5", "llama", "gpt2"])
def test_batch_jsonl_from_stdin_keeps_order_and_fields(tiny_models, data, kind):
    result = invoke(["generate", "-m", tiny_models[kind], "--input", "-", "--max-new-tokens", 5, "--batch-size", 2],
                    input=data.read_text())
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert [(r["index"], r["id"], r["prompt"]) for r in rows] == [(i, p["id"], p["prompt"]) for i, p in enumerate(PROMPTS)]
    assert all(set(r) == {"index", "id", "prompt", "completion", "prompt_tokens", "completion_tokens",
                          "finish_reason", "model"} for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["completion_tokens"] <= 5 for r in rows)
    assert result.stderr == ""  # no terminal: no progress bar, no logs


def test_single_prompt_argument_and_stdin_agree(tiny_models):
    by_arg = invoke(["generate", "-m", tiny_models["llama"], "the movie was", "--max-new-tokens", 6])
    by_pipe = invoke(["generate", "-m", tiny_models["llama"], "--max-new-tokens", 6], input="the movie was\n")
    assert by_arg.exit_code == by_pipe.exit_code == 0
    assert by_arg.stdout == by_pipe.stdout and by_arg.stdout.endswith("\n") and len(by_arg.stdout) > 1
    batch = invoke(["generate", "-m", tiny_models["llama"], "--max-new-tokens", 6, "--format", "jsonl", "the movie was"])
    assert jsonl(batch.stdout)[0]["completion"] + "\n" == by_arg.stdout


def test_echo_prints_the_prompt_first(tiny_models):
    plain = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--max-new-tokens", 4])
    echoed = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--max-new-tokens", 4, "--echo"])
    assert plain.exit_code == echoed.exit_code == 0, plain.stderr + echoed.stderr
    assert echoed.stdout == "the movie" + plain.stdout and plain.stdout.strip()


def test_model_from_environment(fake_lm):
    result = invoke(["generate", "hi", "--max-new-tokens", 3, "-f", "jsonl"], env={"LLMLAB_MODEL": "from/env"})
    assert result.exit_code == 0, result.stderr
    assert fake_lm.loads == ["from/env"]
    assert invoke(["generate", "hi", "-m", "from/flag"], env={"LLMLAB_MODEL": "from/env"}).exit_code == 0
    assert fake_lm.loads == ["from/env", "from/flag"]  # --model wins over the environment


def test_csv_and_text_inputs_and_outputs(tiny_models, tmp_path):
    (tmp_path / "in.csv").write_text("id,question\nq1,the movie\nq2,\"hello, world\"\n")
    out = tmp_path / "out.csv"
    result = invoke(["generate", "-m", tiny_models["llama"], "-i", tmp_path / "in.csv", "--field", "question",
                     "-o", out, "--max-new-tokens", 3])
    assert result.exit_code == 0 and result.stdout == ""
    lines = out.read_text().splitlines()
    assert lines[0] == "index,id,question,prompt,completion,prompt_tokens,completion_tokens,finish_reason,model"
    assert len(lines) == 3
    (tmp_path / "in.txt").write_text("the movie\n\nhello\n")
    txt = tmp_path / "out.txt"
    invoke(["generate", "-m", tiny_models["llama"], "-i", tmp_path / "in.txt", "-o", txt, "--max-new-tokens", 3])
    as_json = invoke(["generate", "-m", tiny_models["llama"], "-i", tmp_path / "in.txt", "--max-new-tokens", 3])
    assert txt.read_text() == "".join(r["completion"] + "\n" for r in jsonl(as_json.stdout))


def test_seed_makes_sampling_repeatable(tiny_models):
    def sample(seed, *extra):
        result = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--sample", "--temperature", 1.3,
                         "--seed", seed, "--max-new-tokens", 8, "-f", "jsonl", *extra])
        assert result.exit_code == 0, result.stderr
        return jsonl(result.stdout)[0]

    first = sample(11)
    assert first["completion_tokens"] > 0 and first["completion"].strip()
    assert sample(11) == first  # the same seed: the same draw, after other draws moved torch's generator on
    assert any(sample(seed)["completion"] != first["completion"] for seed in (12, 13, 14))  # the seed matters
    row = sample(11, "-n", 3)
    assert len(row["completions"]) == 3 and len(row["finish_reason"]) == 3


def test_config_preset_and_flag_override(tiny_models, tmp_path):
    preset = tmp_path / "gen.yaml"
    preset.write_text("max_new_tokens: 2\n")
    short = jsonl(invoke(["generate", "-m", tiny_models["gpt2"], "the movie", "--config", preset, "-f", "jsonl"]).stdout)[0]
    longer = jsonl(invoke(["generate", "-m", tiny_models["gpt2"], "the movie", "--config", preset, "-f", "jsonl",
                           "--max-new-tokens", 6]).stdout)[0]
    assert short["completion_tokens"] <= 2 and longer["completion_tokens"] > 2


def test_stop_flag(tiny_models):
    plain = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--max-new-tokens", 8]).stdout.rstrip("\n")
    stop = plain.strip()[1:3]
    cut = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--max-new-tokens", 8, "--stop", stop, "--stop", "zzz"])
    assert cut.stdout == plain[: plain.index(stop)] + "\n"


def test_chat_template_wraps_the_prompt(tiny_models):
    on = invoke(["generate", "-m", tiny_models["llama-chat"], "hi", "-f", "jsonl", "--max-new-tokens", 2])
    off = invoke(["generate", "-m", tiny_models["llama-chat"], "hi", "-f", "jsonl", "--max-new-tokens", 2, "--chat", "off"])
    # "<|user|>hi</s><|assistant|>" adds three special tokens around the prompt.
    assert jsonl(on.stdout)[0]["prompt_tokens"] == jsonl(off.stdout)[0]["prompt_tokens"] + 3


def test_resume_after_an_interrupted_run(tiny_models, data, tmp_path, monkeypatch):
    from llmlab.scoring import generation

    out = tmp_path / "out.jsonl"
    base = ["generate", "-m", tiny_models["llama"], "-i", data, "-o", out, "--max-new-tokens", 4, "--batch-size", 2]
    full = jsonl(invoke(base[:5] + base[7:]).stdout)
    real_record, calls = generation.record, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_record(*args, **kwargs)

    monkeypatch.setattr(generation, "record", crash_on_third)
    interrupted = invoke(base)
    assert interrupted.exit_code == 130
    assert [r["id"] for r in jsonl(out.read_text())] == ["p0", "p1"]  # finished rows were flushed
    monkeypatch.setattr(generation, "record", real_record)
    resumed = invoke(base + ["--resume"])
    assert resumed.exit_code == 0
    assert jsonl(out.read_text()) == full
    again = invoke(base + ["--resume"])
    assert again.exit_code == 0 and jsonl(out.read_text()) == full


@pytest.mark.parametrize(
    "args, stdin, error, code",
    [
        (["--temperature", "-1", "x"], None, "error: invalid --temperature -1.0: must be 0 (greedy) or >= 0.01", 2),
        (["--top-p", "0", "x"], None, "error: invalid --top-p 0.0: must be in (0, 1]", 2),
        (["--top-k", "-2", "x"], None, "error: invalid --top-k -2: must be an integer >= 0", 2),
        (["--max-new-tokens", "0", "x"], None, "error: invalid --max-new-tokens 0: must be an integer >= 1", 2),
        (["--batch-size", "0", "x"], None, "error: invalid --batch-size '0': give an integer >= 1 or auto", 2),
        (["--batch-size", "many", "x"], None, "error: invalid --batch-size 'many': give an integer >= 1 or auto", 2),
        (["--top-p", "abc", "x"], None, "error: Invalid value for '--top-p': Input should be a valid number", 2),
        (["--bogus", "x"], None, "error: No such option: --bogus", 2),
        ([], "", "error: no prompt: run llmlab generate \"your prompt\", pipe one on stdin, or use --input FILE", 2),
        (["-i", "missing.jsonl"], None, "error: input file 'missing.jsonl' not found", 3),
        (["-i", "-"], '{"prompt": "a"}\n{"prompt": \n', "error: stdin line 2: invalid JSON", 3),
        (["-i", "-"], '{"text": "a"}\n', "error: stdin line 1: no field 'prompt' (fields: text); choose one with --field", 3),
        (["-i", "-", "--input-format", "csv"], 'a,b\n1,2,3\n', "error: stdin line 2: 3 columns but the header has 2", 3),
        (["-m", "nobody/none", "x"], None, "error: model 'nobody/none' is not in the local Hugging Face cache", 4),
        (["-m", "./nowhere", "x"], None, "error: model './nowhere' not found", 4),
        (["--dtype", "int4", "x"], None, "error: Invalid value for '--dtype': 'int4' is not one of 'auto', 'float32', 'bfloat16', 'float16'.", 2),
        (["--chat", "maybe", "x"], None, "error: Invalid value for '--chat': 'maybe' is not one of 'auto', 'on', 'off'.", 2),
        (["-n", "2", "x"], None, "error: --num-return-sequences 2 needs --sample or --num-beams >= 2", 2),
        (["--resume", "x"], None, "error: --resume needs --output FILE", 2),
        (["--format", "xml", "x"], None, "error: Invalid value for '--format' / '-f': 'xml' is not one of 'auto', 'jsonl', 'csv', 'text'.", 2),
        (["--config", "nope.yaml", "x"], None, "error: generation preset 'nope.yaml' not found", 3),
        (["--shots", "-1", "-t", "qa", "x"], None, "error: invalid --shots -1: must be >= 0", 2),
        (["--overflow", "BAD", "x"], None, "error: Invalid value for '--overflow': 'BAD' is not one of", 2),
        (["", "--chat", "off"], None, "error: no prompt: run llmlab generate", 2),
        ([""], None, "error: no prompt: run llmlab generate", 2),
        (["--limit", "0", "-i", "-"], "a\n", "error: invalid --limit 0: must be >= 1", 2),
        (["--offset", "5", "-i", "-"], "a\n", "error: --offset 5: stdin has only 1 rows", 2),
        (["-i", "-", "x"], "a\n", "error: give either a PROMPT argument (or --var) or --input FILE, not both", 2),
    ],
)
def test_user_mistakes_give_one_clear_line(args, stdin, error, code):
    # All fail before a model loads: the model path given does not even exist (no tiny models built).
    model = [] if "-m" in args else ["-m", "./never-loaded"]
    result = invoke(["generate", *model, *args], input=stdin)
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_device(tiny_models):
    result = invoke(["generate", "-m", tiny_models["gpt2"], "--device", "tpu", "x"])
    assert result.exit_code == 2 and result.stderr.startswith("error: invalid --device 'tpu'")


def test_chat_on_without_template(fake_lm):
    assert fake_lm.tokenizer.chat_template is None
    result = invoke(["generate", "-m", "fake", "--chat", "on", "x"])
    assert result.exit_code == 2
    assert result.stderr == "error: --chat on: this model's tokenizer has no chat template; use --chat off or auto\n"


def test_debug_shows_the_traceback():
    from typer.testing import CliRunner

    from llmlab.commands.cli import app
    from llmlab.core.errors import ModelError

    result = CliRunner().invoke(app, ["generate", "-m", "./nowhere", "x"], env={"LLMLAB_DEBUG": "1"})
    assert isinstance(result.exception, ModelError)


def test_help_explains_the_settings():
    result = invoke(["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for phrase in ["[default: (greedy)]", "<first|random|balanced|similar|similar-tfidf|similar-hidden>", "[default: (the template's, else 64)]", "1.0 leaves the distribution unchanged", "Nucleus sampling", "0 = no limit"]:
        assert phrase in result.stdout


def test_beams_and_repetition_penalty(tiny_models):
    result = invoke(["generate", "-m", tiny_models["llama"], "the movie", "--num-beams", 3, "-n", 2,
                     "--repetition-penalty", 1.3, "--max-new-tokens", 5, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    row = jsonl(result.stdout)[0]
    assert len(row["completions"]) == 2 and row["completions"][0] != row["completions"][1]
    assert "was was was" not in row["completions"][0]  # the penalty breaks the random model's loop


def test_duplicate_ids_in_a_batch(no_model):
    result = invoke(["generate", "-m", "./never-loaded", "-i", "-"], input='{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    assert result.exit_code == 3 and "stdin line 2: duplicate id 1" in result.stderr
