"""generate --logprobs / --top-logprobs: each completion token's log-probability, checked against a
softmax of the model's own logits computed by hand (teacher forcing), on tiny real models."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llmlab.backends import models
from llmlab.backends.fake import FakeLM
from llmlab.commands.cli import app
from llmlab.core.errors import UsageError
from llmlab.core.settings import build

runner = CliRunner()


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(tiny_models[k])) for k in ("llama", "t5", "gpt2")}


def by_hand(lm, prompt: str, generated: list[int]) -> list[torch.Tensor]:
    """log_softmax of the model's logits for each generated position, one plain forward per step
    (no cache, no padding): what generate's logits must equal."""
    prompt_ids = lm.token_ids(prompt)
    rows = []
    with torch.no_grad():
        for n in range(len(generated)):
            if lm.is_encoder_decoder:
                start = lm.model.config.decoder_start_token_id
                logits = lm.model(input_ids=torch.tensor([prompt_ids]),
                                  decoder_input_ids=torch.tensor([[start] + generated[:n]])).logits
            else:
                logits = lm.model(input_ids=torch.tensor([prompt_ids + generated[:n]])).logits
            rows.append(torch.log_softmax(logits[0, -1].float(), dim=-1))
    return rows


@pytest.mark.parametrize("kind", ["llama", "t5", "gpt2"])
def test_each_token_logprob_is_the_models_log_softmax(lms, kind):
    lm = lms[kind]
    prompt = "the film was terrible and"
    out = lm.generate([models.GenRequest(prompt)], build({"max_new_tokens": 6, "top_logprobs": 3}))[0]
    tokens = out.logprobs[0]
    assert len(tokens) == out.completion_tokens[0] > 0
    expected = by_hand(lm, prompt, [t.id for t in tokens])
    for token, row in zip(tokens, expected):
        assert token.logprob == pytest.approx(row[token.id].item(), abs=1e-4)
        values, ids = row.topk(3)
        assert [i for _, i, _ in token.top] == ids.tolist()
        assert [v for _, _, v in token.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert token.top[0][1] == token.id  # greedy: the chosen token is the most likely one
        assert [t for t, _, _ in token.top] == [lm.tokenizer.decode([i]) for i in ids.tolist()]
    assert "".join(t.text for t in tokens) == out.completions[0]


def test_batched_logprobs_equal_one_by_one(lms):
    lm = lms["llama"]
    prompts = ["the movie", "Where is Ganymede located in the solar system?", "a"]
    settings = build({"max_new_tokens": 5, "logprobs": True})
    batched = lm.generate([models.GenRequest(p) for p in prompts], settings, batch_size=3)
    for prompt, b in zip(prompts, batched):
        single = lm.generate([models.GenRequest(prompt)], settings, batch_size=1)[0]
        assert [t.id for t in b.logprobs[0]] == [t.id for t in single.logprobs[0]]
        assert [t.logprob for t in b.logprobs[0]] == pytest.approx([t.logprob for t in single.logprobs[0]], abs=1e-4)
        assert all(not t.top for t in b.logprobs[0])  # no --top-logprobs: no alternatives


def test_sampled_sequences_each_get_their_own_logprobs(lms):
    lm = lms["llama"]
    settings = build({"max_new_tokens": 5, "temperature": 1.5, "seed": 3, "num_return_sequences": 2,
                      "logprobs": True})
    out = lm.generate([models.GenRequest("the movie")], settings)[0]
    assert len(out.logprobs) == 2
    for completion, count, tokens in zip(out.completions, out.completion_tokens, out.logprobs):
        assert len(tokens) == count
        expected = by_hand(lm, "the movie", [t.id for t in tokens])
        # sampling at temperature 1.5 reshapes what is drawn from, not what is reported
        assert [t.logprob for t in tokens] == pytest.approx([r[t.id].item() for t, r in zip(tokens, expected)], abs=1e-4)
        assert "".join(t.text for t in tokens) == completion


def test_a_stop_text_ends_the_tokens_at_the_one_that_completed_it(lms):
    lm = lms["llama"]
    plain = lm.generate([models.GenRequest("the movie")], build({"max_new_tokens": 8, "logprobs": True}))[0]
    text = plain.completions[0]
    stop = text.strip()[1:3]
    cut = lm.generate([models.GenRequest("the movie")],
                      build({"max_new_tokens": 8, "stop": [stop], "logprobs": True}))[0]
    tokens = cut.logprobs[0]
    assert len(tokens) == cut.completion_tokens[0] < len(plain.logprobs[0])
    joined = "".join(t.text for t in tokens)
    before_last = "".join(t.text for t in tokens[:-1])
    assert joined.startswith(cut.completions[0]) and stop in joined and stop not in before_last
    assert [t.logprob for t in tokens] == [t.logprob for t in plain.logprobs[0][: len(tokens)]]


@pytest.mark.parametrize("changes, message", [
    ({"top_logprobs": 21}, "invalid --top-logprobs 21: must be an integer from 0 to 20"),
    ({"top_logprobs": -1}, "invalid --top-logprobs -1: must be an integer from 0 to 20"),
    ({"logprobs": True, "num_beams": 2}, "--logprobs reports the tokens of greedy or sampled decoding"),
])
def test_setting_mistakes(changes, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        build(changes)


def test_top_logprobs_implies_logprobs():
    assert build({"top_logprobs": 2}).logprobs is True
    assert "output_logits" not in build({}).generate_kwargs()


# ---------------------------------------------------------------- the command


@pytest.fixture
def llama_cli(lms, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: lms["llama"])
    return lms["llama"]


def test_jsonl_record_carries_each_token(llama_cli, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "the movie"}\n{"prompt": "a"}\n')
    result = runner.invoke(app, ["generate", "-i", str(data), "--max-new-tokens", "4", "--top-logprobs", "2",
                                 "--no-log"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for rec in records:
        tokens = rec["logprobs"]
        assert len(tokens) == rec["completion_tokens"]
        assert "".join(t["token"] for t in tokens) == rec["completion"]
        for t in tokens:
            assert set(t) == {"token", "id", "logprob", "top_logprobs"} and t["logprob"] <= 0
            assert len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["id"] == t["id"]
            assert math.isfinite(t["logprob"])


def test_one_piped_prompt_with_logprobs_is_a_jsonl_record(llama_cli):
    """Streamed plain text would lose the numbers: piped, one prompt becomes one JSONL record."""
    result = runner.invoke(app, ["generate", "the movie", "--max-new-tokens", "3", "--logprobs", "--no-log"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert rec["prompt"] == "the movie" and len(rec["logprobs"]) == rec["completion_tokens"]
    assert all("top_logprobs" not in t for t in rec["logprobs"])


@pytest.mark.parametrize("args, message", [
    (["--logprobs", "-o", "{tmp}/out.txt"],
     "--logprobs: the text format keeps only the completion; write JSONL or CSV (-o FILE.jsonl or --format jsonl)"),
    (["--top-logprobs", "50"], "invalid --top-logprobs 50: must be an integer from 0 to 20"),
    (["--logprobs", "--num-beams", "2"],
     "--logprobs reports the tokens of greedy or sampled decoding, not of beam search; use --num-beams 1"),
])
def test_command_mistakes_stop_before_the_model_loads(args, message, monkeypatch, tmp_path):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load", no_model)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["generate", "hi", "--no-log", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_fake_model_logprobs_flow_through(monkeypatch):
    """Above the boundary the logprobs of any backend reach the record unchanged."""
    lm = FakeLM(answers=["ok"])
    monkeypatch.setattr(models, "load", lambda *a, **k: lm)
    result = runner.invoke(app, ["generate", "hi", "--logprobs", "--format", "jsonl", "--no-log"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert [t["token"] for t in rec["logprobs"]] == ["o", "k"]


@pytest.mark.parametrize("p, style", [(1.0, "green"), (0.9, "green"), (0.89, "yellow"), (0.5, "yellow"),
                                      (0.2, "dark_orange"), (0.1, "dark_orange"), (0.05, "red"), (1e-9, "red")])
def test_probability_colours(p, style):
    from llmlab.io import render

    assert render.prob_style(math.log(p)) == style


def test_terminal_shows_coloured_tokens_and_the_alternatives(monkeypatch):
    from llmlab.core import console
    from llmlab.io import render

    lm = FakeLM(answers=["ok!"])  # token k has probability 0.9 ** (k + 1): 90%, 81%, 72.9%
    monkeypatch.setattr(models, "load", lambda *a, **k: lm)
    monkeypatch.setattr(console, "stdout_is_terminal", lambda: True)
    result = runner.invoke(app, ["generate", "hi", "--top-logprobs", "2", "--no-log"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["ok!", "token colour = its probability under the model: >= 90%  50-90%  10-50%  < 10%"]
    assert [line.split("│")[1:4] for line in lines if line.startswith("│")] == [
        [" 1 ", " 'o'   ", " 90.0% "], [" 2 ", " 'k'   ", " 81.0% "], [" 3 ", " '!'   ", " 72.9% "]]
    assert "'p' 9.0%" in lines[5]  # the runner-up, ten times less likely
    spans = render.coloured(lm._logprobs("ok!", 0)).spans
    assert [(s.start, s.end, s.style) for s in spans] == [(0, 1, "green"), (1, 2, "yellow"), (2, 3, "yellow")]
