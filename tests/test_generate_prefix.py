"""One-prompt generation reuses the keys and values of a remembered prompt's shared start
(backends/prefix_cache.for_generation): the prompt's forward pass runs over its new tokens only, and
the outputs are the uncached path's (greedy tokens, counts, finish reasons; log-probabilities to float
precision)."""

from __future__ import annotations

import pytest

from helpers import TEST_DEVICE
from llmlab.backends import models, prefix_cache
from llmlab.core.settings import build

START = "You are a careful assistant. Answer in one short sentence, please. "
ASKS = ["hi", "hello there", "the movie was", "hi", "what is the sky", "hello there, friend"]


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(tiny_models[k]), TEST_DEVICE) for k in ("llama", "gpt2", "llama-chat")}


def requests(lm, kind):
    if kind != "llama-chat":
        return [models.GenRequest(START + ask) for ask in ASKS]
    chat = [lm.hf_tokenizer.apply_chat_template([{"role": "system", "content": START}, {"role": "user", "content": a}],
                                                tokenize=False, add_generation_prompt=True) for a in ASKS]
    return [models.GenRequest(text, templated=True) for text in chat]


def first_pass_lengths(lm, monkeypatch):
    """The number of tokens each generate()'s first forward pass runs over."""
    seen, real = [], lm.model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        seen.append(None if ids is None else ids.shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", forward)
    return seen


@pytest.mark.parametrize("kind", ["llama", "gpt2", "llama-chat"])
@pytest.mark.parametrize("flags", [{"max_new_tokens": 6}, {"max_new_tokens": 4, "logprobs": True, "top_logprobs": 2}])
def test_reused_start_gives_the_uncached_outputs(lms, kind, flags, monkeypatch):
    lm, settings = lms[kind], build(flags)
    lm.forget_prefixes()
    asks = requests(lm, kind)
    cached = [lm.generate([r], settings)[0] for r in asks]
    prompts = [len(lm.encode([r.prompt], [r.templated])[0]) for r in asks]
    with monkeypatch.context() as patch:
        patch.setattr(prefix_cache, "for_generation", lambda *a: None)
        plain = [lm.generate([r], settings)[0] for r in asks]
    for a, b in zip(cached, plain):
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert [t.logprob for t in x] == pytest.approx([t.logprob for t in y], abs=1e-4)
            assert [(t.text, t.id, [u[:2] for u in t.top]) for t in x] == [(t.text, t.id, [u[:2] for u in t.top]) for t in y]
        a.logprobs = b.logprobs = None
    assert cached == plain
    seen = first_pass_lengths(lm, monkeypatch)
    lm.forget_prefixes()
    starts = []
    for r, n in zip(asks, prompts):
        seen.clear()
        lm.generate([r], settings)
        starts.append(seen[0])
    assert starts[0] == prompts[0]  # nothing remembered yet: the whole prompt
    assert starts[3] == 1  # "hi" again: only its last token
    shared = len(lm.encode([START], [False])[0]) - 2  # at least the start, less what may merge at the seam
    assert all(s < n - shared for s, n in zip(starts[1:], prompts[1:])), (starts, prompts)


def test_batches_beams_prompt_tuning_and_encoder_decoder_run_as_before(lms, tiny_models, monkeypatch):
    from llmlab.backends.adapters import PromptTunedLM

    lm = lms["llama"]
    rows = [[1, 2, 3] * 4]
    assert prefix_cache.for_generation(lm, rows, True) is not None
    assert prefix_cache.for_generation(lm, rows + rows, True) is None  # two rows: padded as always
    assert prefix_cache.for_generation(lm, rows, False) is None  # beams or several sequences
    assert PromptTunedLM.reuse_prompts is False  # its virtual tokens come before the prompt
    monkeypatch.setattr(lm, "reuse_prompts", False)
    assert prefix_cache.for_generation(lm, rows, True) is None
    t5 = models.load(str(tiny_models["t5"]), TEST_DEVICE)
    assert prefix_cache.for_generation(t5, rows, True) is None


def test_the_memo_stays_bounded_and_forgets_with_the_weights(lms):
    lm = lms["llama"]
    lm.forget_prefixes()
    settings = build({"max_new_tokens": 2})
    for n in range(7):
        lm.generate([models.GenRequest(f"{n} " + START)], settings)
    assert len(lm._prefixes) == 4
    lm.forget_prefixes()
    assert not lm._prefixes


def test_a_sliding_window_cache_is_never_reused(lms):
    from transformers.cache_utils import DynamicSlidingWindowLayer

    lm = lms["llama"]
    lm.forget_prefixes()
    row = lm.token_ids(START + "hi")
    lm.generate([models.GenRequest(START + "hi")], build({"max_new_tokens": 1}))
    assert prefix_cache.for_generation(lm, [row], True).get_seq_length() == len(row) - 1  # remembered: reused
    (kept,) = lm._prefixes.values()
    kept.layers[0].__class__ = DynamicSlidingWindowLayer  # as a model with a sliding window keeps it
    assert prefix_cache.for_generation(lm, [row], True).get_seq_length() == 0  # a crop would not be a prefix
    lm.forget_prefixes()
