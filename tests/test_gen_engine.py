"""--gen-engine: transformers' continuous batching (generate_batch) gives the padded engine's
outputs under greedy decoding, stop texts included; settings it can't honour are refused up front."""

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from helpers import TEST_DEVICE, invoke, jsonl
from llmlab.backends import models
from llmlab.backends import hf_continuous
from llmlab.core.errors import UsageError
from llmlab.core.settings import build

PROMPTS = ["the movie", "a", "hello there", "the film was great and I loved it", "Review: a charming story."]


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(tiny_models[k]), TEST_DEVICE) for k in ("llama", "gpt2", "t5")}


def run(lm, engine, settings, batch_size=3):
    return lm.generate([models.GenRequest(p) for p in PROMPTS], settings, batch_size=batch_size, engine=engine)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_continuous_equals_padded_under_greedy_decoding(lms, kind, monkeypatch):
    calls = []
    real = hf_continuous.generate_rows
    monkeypatch.setattr(hf_continuous, "generate_rows", lambda lm, rows, *a: calls.append(len(rows)) or real(lm, rows, *a))
    settings = build({"max_new_tokens": 8})
    padded = run(lms[kind], "padded", settings)
    assert calls == []
    continuous = run(lms[kind], "continuous", settings)
    assert calls == [3, 2]  # batches of consecutive inputs, as the padded engine runs them
    assert continuous == padded  # texts, prompt and completion token counts, finish reasons


def test_stop_texts_cut_where_the_padded_engine_cuts(lms):
    lm = lms["llama"]
    free = run(lm, "padded", build({"max_new_tokens": 8}))
    stop = free[0].completions[0][3:5]  # a text inside the first completion, so that row stops early
    settings = build({"max_new_tokens": 8, "stop": [stop]})
    padded, continuous = run(lm, "padded", settings), run(lm, "continuous", settings)
    assert continuous == padded
    assert continuous[0].finish_reasons == ["stop"] and stop not in continuous[0].completions[0]
    assert continuous[0].completion_tokens[0] < 8


@pytest.mark.parametrize("device, engine, flags, expected", [
    ("cpu", "auto", {}, hf_continuous.AUTO["cpu"]),
    ("cpu", "auto", {"requests": 1, "max_new_tokens": 400}, "padded"),  # nothing to batch; padded streams it
    ("cpu", "auto", {"requests": 4, "max_new_tokens": 4}, "padded"),  # too little work for its fixed cost
    ("cpu", "continuous", {"requests": 1}, "continuous"),
    ("cuda", "auto", {}, "padded"),  # not measured on a GPU yet
    ("cuda:1", "continuous", {}, "continuous"),
    ("cpu", "padded", {}, "padded"),
    ("cpu", "auto", {"do_sample": True}, "padded"),
    ("cpu", "auto", {"num_beams": 2}, "padded"),
    ("cpu", "auto", {"repetition_penalty": 1.2}, "padded"),
    ("cpu", "auto", {"logprobs": True}, "padded"),  # generate_batch returns no per-step logits
])
def test_choice_of_engine(device, engine, flags, expected):
    lm = SimpleNamespace(device=device, is_encoder_decoder=False, model=SimpleNamespace(generate_batch=None))
    settings = {"max_new_tokens": 64, **{k: v for k, v in flags.items() if k != "requests"}}
    assert hf_continuous.choose(lm, build(settings), flags.get("requests", 8), engine) == expected


def test_encoder_decoder_models_run_padded_and_refuse_continuous(lms):
    lm = lms["t5"]
    assert hf_continuous.choose(lm, build({})) == "padded"
    with pytest.raises(UsageError, match="^--gen-engine continuous does not run an encoder-decoder model"):
        run(lm, "continuous", build({"max_new_tokens": 2}))


SAMPLING = "sampling (--sample, --temperature, --top-k, --top-p)"


@pytest.mark.parametrize("flags, why", [
    (["--sample"], SAMPLING),
    (["--temperature", "0.7"], SAMPLING),
    (["--num-beams", "2"], "beam search (--num-beams)"),
    (["--repetition-penalty", "1.3"], "--repetition-penalty"),
    (["--top-logprobs", "2"], "per-token log-probabilities (--logprobs, --top-logprobs)"),
])
def test_cli_refuses_what_continuous_batching_cannot_do_before_loading(tmp_path, flags, why):
    missing = tmp_path / "no-such-model"  # never loaded: the refusal comes first
    result = invoke(["generate", "-m", missing, "--gen-engine", "continuous", *flags, "hi"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --gen-engine continuous decodes greedily and cannot do {why}; use --gen-engine padded (or auto)"]


def test_cli_engines_write_the_same_records(tiny_models, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    out = {}
    for engine in ("padded", "continuous"):
        result = invoke(["generate", "-m", tiny_models["llama"], "-i", data, "--max-new-tokens", 6,
                         "--gen-engine", engine, "--batch-size", 2, "--stop", "ie"])
        assert result.exit_code == 0, result.stderr
        out[engine] = jsonl(result.stdout)
    assert out["continuous"] == out["padded"] and len(out["padded"]) == len(PROMPTS)


def test_one_prompt_on_the_terminal_prints_the_same_text(tiny_models):
    out = {engine: invoke(["generate", "-m", tiny_models["llama"], "--max-new-tokens", 5, "--gen-engine", engine,
                           "the movie"]) for engine in ("padded", "continuous")}
    assert out["padded"].exit_code == out["continuous"].exit_code == 0
    assert out["continuous"].stdout == out["padded"].stdout and out["padded"].stdout.strip()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_signal_during_continuous_batching_stops_the_run(tiny_models, tmp_path, sig, code):
    """generate_batch's garbage collections once swallowed a SIGTERM (the run went on to the end)."""
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the movie {i} was"}) + "\n" for i in range(200)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmlab", "generate", "-m", str(tiny_models["llama"]), "-i", str(data), "-o", str(out),
         "--max-new-tokens", "64", "--batch-size", "4", "--gen-engine", "continuous"],
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 4) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # well into the run: the manual run that lost a SIGTERM sent it 3 s in
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, proc.stderr.read()
    finally:
        proc.kill()
    records = [json.loads(line) for line in out.read_text().splitlines()]  # whole records only
    assert 4 <= len(records) < 200 and [r["index"] for r in records] == list(range(len(records)))
    assert "Traceback" not in proc.stderr.read()
