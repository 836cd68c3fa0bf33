"""llmlab next: probabilities equal a softmax of the model's logits after transformers' own warping,
and walking K tokens gives what generate gives."""

import pytest

from helpers import TEST_DEVICE, invoke, jsonl, on_device

PROMPT = "the movie was"


@pytest.fixture(scope="module")
def loaded(tiny_models):
    from llmlab.backends import models

    return {k: models.load(str(tiny_models[k]), TEST_DEVICE, "float32") for k in ("t5", "llama")}


def _oracle(lm, temperature, top_k, top_p):
    """The next-token logits by a plain forward pass, warped by transformers' warpers in generate's order."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = on_device(lm, [lm.token_ids(PROMPT)])
    with torch.inference_mode():
        if lm.is_encoder_decoder:
            logits = lm.model(input_ids=ids, decoder_input_ids=on_device(lm, [[0]])).logits[0, -1]
        else:
            logits = lm.model(input_ids=ids).logits[0, -1]
    scores = logits[None]
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(ids, scores)
    return torch.softmax(logits, -1), torch.softmax(scores[0], -1)


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 50, 0.9), (1.5, 10, 1.0), (0.3, 0, 0.5)])
def test_probabilities_equal_softmax_after_transformers_warping(tiny_models, loaded, kind, temperature, top_k, top_p):
    result = invoke(["next", "-m", tiny_models[kind], PROMPT, "--temperature", temperature, "--top-k", top_k,
                     "--top-p", top_p, "--show", 400, "--seed", 0])
    assert result.exit_code == 0, result.stderr
    (step,) = jsonl(result.stdout)
    p, q = _oracle(loaded[kind], temperature, top_k or 400, top_p)
    for c in step["top"]:
        assert c["p"] == pytest.approx(float(p[c["id"]]), abs=1e-6)
        assert c["p_warped"] == pytest.approx(float(q[c["id"]]), abs=1e-6)
        assert (c["cut_by"] is None) == (float(q[c["id"]]) > 0)
    assert step["kept"] == int((q > 0).sum()) and step["vocab"] == 400
    assert [c["rank"] for c in step["top"]] == list(range(1, 401))
    assert step["mode"] == "sample" and step["chosen"]["p_warped"] > 0  # a sample is never a cut token
    cut = {c["cut_by"] for c in step["top"]} - {None}
    expected = ({f"top_k={top_k}"} if top_k else set()) | ({f"top_p={top_p:g}"} if top_p < 1 else set())
    assert cut == expected


def test_matches_generates_own_scores(loaded):
    """The same distribution generate() samples from (output_scores), not just the same formula."""
    import torch

    from llmlab.learn import nexttoken
    from llmlab.core import settings

    lm = loaded["llama"]
    s = settings.build({"temperature": 0.8, "top_k": 30, "top_p": 0.95, "repetition_penalty": 1.3, "seed": 0})
    steps = list(nexttoken.walk(lm, PROMPT, False, s, steps=3, show=400))
    ids = on_device(lm, [lm.token_ids(PROMPT)])
    torch.manual_seed(0)
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True,
                            temperature=0.8, top_k=30, top_p=0.95, repetition_penalty=1.3, pad_token_id=0,
                            output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    for step, scores, token in zip(steps, out.scores, out.sequences[0, ids.shape[1]:]):
        q = torch.softmax(scores[0], -1)
        assert max(abs(c["p_warped"] - float(q[c["id"]])) for c in step.to_json()["top"]) < 1e-5
        assert step.chosen.id == int(token)  # the same seeded draw


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("mode", [["--greedy"], ["--sample", "--seed", "3", "--top-k", "20"], ["--sample", "--seed", "5"]])
def test_walking_k_steps_gives_what_generate_gives(tiny_models, kind, mode):
    walked = jsonl(invoke(["next", "-m", tiny_models[kind], PROMPT, "--steps", 6, *mode]).stdout)
    made = invoke(["generate", "-m", tiny_models[kind], PROMPT, "--max-new-tokens", 6, *mode, "-f", "jsonl"])
    record = jsonl(made.stdout)[0]
    assert walked[-1]["completion"] == record["completion"]
    assert len(walked) == record["completion_tokens"] + (1 if walked[-1]["end"] else 0)
    if mode == ["--greedy"]:
        assert all(s["chosen"]["rank"] == 1 and s["warpers"] == [] for s in walked)


def test_terminal_view_marks_the_pick_and_the_cuts(tiny_models):
    result = invoke(["next", "-m", tiny_models["llama"], PROMPT, "--top-k", 2, "--show", 3, "--seed", 1, "-f", "text"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "step 1: next token after 3 tokens (sample)"
    assert "p after top_k=2" in lines[2]
    assert sum("◀ picked" in line for line in lines) == 1 and "cut by top_k=2" in lines[-4]
    assert lines[-2] == "2 of 400 tokens can be drawn; the other 398 are cut (probability 0)"


@pytest.mark.parametrize("args, message", [
    (["next"], "error: no prompt: run llmlab next"),
    (["next", "x", "--steps", "0"], "error: invalid --steps 0 / --show 10: both must be >= 1"),
    (["next", "x", "--top-p", "0"], "error: invalid --top-p 0.0: must be in (0, 1] (1 = no limit)"),
])
def test_mistakes_before_loading(args, message):
    result = invoke(args + ["-m", "/nonexistent/model"])  # fails on the option, before looking for the model
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_window_overflow_is_refused(fake_lm):
    fake_lm.window = 64
    result = invoke(["next", "-m", "fake", "the " * 70, "--steps", 1])
    assert result.exit_code == 5 and "64-token window" in result.stderr


def test_an_encoder_decoder_without_a_decoder_start_token_is_refused(fake_lm):
    fake_lm.is_encoder_decoder = True  # FakeLM names no decoder start token (decoder_start_id is None)
    result = invoke(["next", "-m", "fake", "the movie", "--steps", 1])
    assert result.exit_code == 4
    assert result.stderr == ("error: model 'fake' is encoder-decoder but names no decoder start token "
                             "(decoder_start_token_id in its config)\n")


def test_the_fake_backend_walks(fake_lm):
    """FakeLM implements next_logits, so `next` runs on it: its tokenizer names each token (it lacked
    convert_ids_to_tokens, which mypy found: `next -m fake` crashed with an AttributeError)."""
    result = invoke(["next", "-m", "fake", "ab", "--steps", 2, "--show", 2, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    steps = jsonl(result.stdout)
    assert [s["completion"] for s in steps] == ["c", "cd"]
    assert [[(t["id"], t["token"], t["text"]) for t in s["top"]] for s in steps] == [
        [(102, "c", "c"), (103, "d", "d")], [(103, "d", "d"), (104, "e", "e")]]
