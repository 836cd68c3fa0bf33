"""The vLLM backend's translation between llmlab's requests and vLLM's objects, checked against a
stand-in for vllm.LLM that answers like vLLM (RequestOutput-shaped objects: prompt_logprobs as
{token id: Logprob} per position, CompletionOutput with text, token_ids, finish_reason) but
computes with a real tiny transformers model. So the vLLM backend must give the same scores and
greedy completions as HFLM on that model. Real vLLM runs are GPU-only (skipped here)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmlab.backends.base import GenRequest, LLRequest
from llmlab.backends.vllm import VLLM, check_options, parse_prompt_logprobs
from llmlab.core.config import ModelConfig
from llmlab.core.errors import ContextOverflowError, UsageError
from llmlab.orchestration.session import settings_for


@dataclass
class Logprob:  # vllm.sequence.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    prompt_logprobs: list[Any] | None
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class SamplingParams:  # the fields llmlab sets on vllm.SamplingParams
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    detokenize: bool = True
    logprobs: int | None = None


class StandInLLM:
    """vllm.LLM.generate(prompts, sampling_params, use_tqdm) over a transformers model."""

    def __init__(self, hf_lm):
        self.hf = hf_lm
        self.calls: list[tuple[list[dict], SamplingParams]] = []

    def generate(self, prompts, params, use_tqdm=True):
        import torch

        self.calls.append((prompts, params))
        model, tok = self.hf.model, self.hf.tokenizer
        out = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            prompt_lps = None
            if params.prompt_logprobs:
                prompt_lps = [None]  # position 0: nothing precedes it
                for j in range(1, len(ids)):
                    row = logprobs[j - 1]
                    top = int(row.argmax())
                    prompt_lps.append({ids[j]: Logprob(float(row[ids[j]])), top: Logprob(float(row[top]), 1)})
            completions = []
            if params.max_tokens and params.temperature == 0 and not params.prompt_logprobs:
                gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=params.max_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
                reason = "length"
                if tok.eos_token_id in gen:
                    gen, reason = gen[: gen.index(tok.eos_token_id)], "stop"
                text = tok.decode(gen, skip_special_tokens=True)
                for stop in params.stop or []:
                    if stop in text:
                        text, reason = text[: text.index(stop)], "stop"
                steps = self.sample_logprobs(ids, gen, params.logprobs) if params.logprobs is not None else None
                completions.append(CompletionOutput(0, text, gen, reason, steps))
            out.append(RequestOutput(ids, prompt_lps, completions))
        return out

    def sample_logprobs(self, ids, gen, top):
        """As vLLM: per generated token {id: Logprob(logprob, rank, decoded)}, the top `top` by rank
        and the sampled token (which may rank lower)."""
        import torch

        tok = self.hf.tokenizer
        with torch.inference_mode():
            logits = self.hf.model(input_ids=torch.tensor([ids + gen])).logits[0, len(ids) - 1 : -1]
        steps = []
        for token, row in zip(gen, torch.log_softmax(logits.float(), -1)):
            order = row.argsort(descending=True).tolist()
            keep = order[:top] + ([token] if token not in order[:top] else [])
            steps.append({i: Logprob(float(row[i]), order.index(i) + 1, tok.decode([i])) for i in keep})
        return steps


@pytest.fixture(scope="module")
def pair(tiny_models):
    from llmlab.backends import models

    hf = models.load(str(tiny_models["llama"]), "cpu", "float32")
    engine = StandInLLM(hf)
    return hf, VLLM("tiny", engine, hf.tokenizer, hf.window, sampling_params=SamplingParams), engine


REQUESTS = [
    LLRequest("Review: a charming story. Sentiment:", " positive"),
    LLRequest("Review: a charming story. Sentiment: ", "negative"),  # trailing space moves to the label
    LLRequest("the movie was great and I loved it", " the film was terrible and boring"),
    LLRequest("Review: a charming story. Sentiment:", " positive"),  # a duplicate: scored once
]


def test_scores_match_the_transformers_backend(pair):
    hf, lm, engine = pair
    engine.calls.clear()
    want = hf.loglikelihood(REQUESTS, prefix_cache=False)
    got = lm.loglikelihood(REQUESTS)
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert [o.greedy for o in got] == [o.greedy for o in want]
    assert [o.logprob for o in got] == pytest.approx([o.logprob for o in want], abs=1e-4)
    prompts, params = engine.calls[0]
    assert len(prompts) == 3  # the duplicate request was not sent again
    assert (params.prompt_logprobs, params.max_tokens, params.temperature) == (1, 1, 0.0)


def test_greedy_flag_follows_the_top_token():
    # position 1 predicts token 7 (top) and position 2 token 9 (not the top: 4 is)
    lps = [None, {7: Logprob(-0.1), 3: Logprob(-2.0)}, {9: Logprob(-1.5), 4: Logprob(-0.4)}]
    assert parse_prompt_logprobs([5, 7, 9], lps, 1) == pytest.approx((-1.6, False))
    assert parse_prompt_logprobs([5, 7, 9], lps, 2)[1] is False
    assert parse_prompt_logprobs([5, 7], lps[:2], 1) == pytest.approx((-0.1, True))
    assert parse_prompt_logprobs([5, 7], [None, {7: -0.25}], 1) == pytest.approx((-0.25, True))  # float logprobs


def test_greedy_generation_matches_the_transformers_backend(pair):
    hf, lm, engine = pair
    settings = settings_for(None, None, {"max_new_tokens": 6})
    reqs = [GenRequest("the movie was"), GenRequest("Ganymede is a moon"), GenRequest("Dialogue: hello there.")]
    seen = []
    got = lm.generate(reqs, settings, on_output=lambda i, o: seen.append(i))
    want = hf.generate(reqs, settings)
    assert [o.completions for o in got] == [o.completions for o in want]
    assert [o.prompt_tokens for o in got] == [o.prompt_tokens for o in want]
    assert [o.completion_tokens for o in got] == [o.completion_tokens for o in want]
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("top", [0, 3])
def test_logprobs_match_the_transformers_backend(pair, top):
    hf, lm, engine = pair
    settings = settings_for(None, None, {"max_new_tokens": 5, "logprobs": True, "top_logprobs": top})
    got = lm.generate([GenRequest("the movie was")], settings)[0].logprobs[0]
    want = hf.generate([GenRequest("the movie was")], settings)[0].logprobs[0]
    assert engine.calls[-1][1].logprobs == top
    assert [t.id for t in got] == [t.id for t in want] and [t.text for t in got] == [t.text for t in want]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-4)
    assert [[i for _, i, _ in t.top] for t in got] == [[i for _, i, _ in t.top] for t in want]
    assert all(len(t.top) == top for t in got)


def test_stop_texts_and_finish_reasons(pair):
    hf, lm, engine = pair
    free = lm.generate([GenRequest("the movie was")], settings_for(None, None, {"max_new_tokens": 6}))[0]
    stop = free.completions[0][2:4]  # a piece of what it generates anyway
    settings = settings_for(None, None, {"max_new_tokens": 6, "stop": [stop]})
    out = lm.generate([GenRequest("the movie was")], settings)[0]
    assert out.completions == [free.completions[0][: free.completions[0].index(stop)]]
    assert out.finish_reasons == ["stop"]
    assert engine.calls[-1][1].stop == [stop]


def test_sampling_settings_translate_to_sampling_params(pair):
    _, lm, _ = pair
    sampled = lm.generation_params(settings_for(None, None, {"temperature": 0.7, "top_k": 5, "top_p": 0.9,
                                                             "seed": 3, "num_return_sequences": 2,
                                                             "max_new_tokens": 9}))
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.seed, sampled.n, sampled.max_tokens) == \
        (0.7, 5, 0.9, 3, 2, 9)
    greedy = lm.generation_params(settings_for(None, None, {"temperature": 0.7, "do_sample": False}))
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, -1, 1.0)
    with pytest.raises(UsageError, match="num-beams"):
        lm.generation_params(settings_for(None, None, {"num_beams": 2}))


def test_no_hidden_states_for_a_probe(pair):
    _, lm, engine = pair
    before = len(engine.calls)
    with pytest.raises(UsageError, match="--calibration probe reads hidden states, which --backend vllm does not give"):
        lm.loglikelihood(REQUESTS[:1], hidden_layers=[1])
    assert len(engine.calls) == before


def test_window_is_checked_before_vllm_runs(pair):
    hf, _, engine = pair
    small = VLLM("tiny", engine, hf.tokenizer, 8, sampling_params=SamplingParams)
    before = len(engine.calls)
    with pytest.raises(ContextOverflowError, match="8-token window"):
        small.loglikelihood([LLRequest("the movie was great and I loved it", " yes")])
    with pytest.raises(ContextOverflowError, match="8-token window"):
        small.generate([GenRequest("the movie was great")], settings_for(None, None, {"max_new_tokens": 6}))
    assert len(engine.calls) == before


@pytest.mark.parametrize("changes, message", [
    ({"device_map": "auto"}, "--device-map/--max-memory are for --backend hf"),
    ({"device": "cpu"}, "CUDA GPUs only"),
    ({"tensor_parallel_size": 0}, "invalid --tensor-parallel-size 0"),
])
def test_option_mistakes(changes, message):
    cfg = ModelConfig(backend="vllm", **changes)
    with pytest.raises(UsageError, match=message):
        check_options(cfg)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_one_clear_line():
    from helpers import invoke

    result = invoke(["generate", "--backend", "vllm", "hi"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --backend vllm needs vLLM (CUDA GPUs only): pip install vllm, or the llmlab extra 'vllm'"


def _gpu_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _gpu_vllm(), reason="GPU-only: needs CUDA and vLLM (pip install 'llmlab[vllm]')")
def test_real_vllm_agrees_with_transformers(tmp_path):
    """On a GPU with vLLM: a small random Llama (head size 64, which vLLM's kernels support)
    scored and generated by both backends."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmlab.backends import models
    from llmlab.backends import vllm as backend

    tok = build_tokenizer("plain")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=3, eos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    real = backend.load(str(tmp_path), "float32")
    hf = models.load(str(tmp_path), "cuda", "float32")
    assert [o.logprob for o in real.loglikelihood(REQUESTS)] == pytest.approx(
        [o.logprob for o in hf.loglikelihood(REQUESTS)], abs=1e-3)
    settings = settings_for(None, None, {"max_new_tokens": 6})
    assert real.generate([GenRequest("the movie was")], settings)[0].completion_tokens[0] > 0
