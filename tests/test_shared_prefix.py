"""Rows continuing one cached prefix attend to ONE copy of its keys and values (shared_prefix):
scores equal the full forward pass, and a 16-shot batch needs less memory than repeating the
prefix's KV cache per row (the copying path, HFLM.share_prefix = False)."""

import copy
import json
import tempfile

import pytest

from helpers import TEST_DEVICE
from llmlab.backends import models, prefix_cache, shared_prefix
from llmlab.backends.hf import HFLM
from test_classify import by_hand

pytestmark = pytest.mark.slow

SHOTS = "Label each review.\n\nReview: great fun\nSentiment: Positive\n\nReview: so bad\nSentiment: Negative\n\n"
CASES = [
    (SHOTS, "Review: a"),  # the shortest row: most left padding in its batch
    (SHOTS, "Review: the movie was great and long and fun, a good film"),
    (SHOTS, "Review: so dull"),
    # the prefix ends inside a word: " mo" + "vie" is one token in the whole text, so the cached
    # prefix stops before the seam and rows differ from the prefix's own tokens at its end
    (SHOTS + "Review: the mo", "vie"),
    (SHOTS + "Review: the mo", "vie was great"),
    (SHOTS + "Review: the mo", "od"),
    # a prefix whose tokens the row leaves at once ("Lab" + "el" merge): no cache, the plain path
    ("Lab", "el each review.\n\nReview: fine"),
]
LABELS = (" positive", " Negative words")  # a one-token and a multi-token continuation


@pytest.fixture(scope="module")
def lms(tiny_models, tmp_path_factory):
    from conftest import build_model

    gpt2 = build_model("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2-512", window=512)  # room for SHOTS
    return {"gpt2": models.load(str(gpt2), TEST_DEVICE),
            **{k: models.load(str(tiny_models[k]), TEST_DEVICE) for k in ("llama", "t5")}}


def requests_for(cases):
    return [models.LLRequest(p + f"{t}\nSentiment:", c, prefix=p) for p, t in cases for c in LABELS]


class Spy:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_shared_prefix_scores_equal_the_full_forward_pass(lms, monkeypatch, kind):
    lm = lms[kind]
    requests = requests_for(CASES)
    full = lm.loglikelihood(requests, batch_size=4, prefix_cache=False)
    getattr(lm, "_prefixes", {}).clear()  # no prefix kept from an earlier test
    shared = Spy(monkeypatch, shared_prefix, "forward_kwargs")
    computed = Spy(monkeypatch, lm, "prefix_kv")
    monkeypatch.setattr(prefix_cache, "extend", lambda *a, **k: pytest.fail("the prefix's KV cache was copied"))
    out = lm.loglikelihood(requests, batch_size=4)
    if kind == "t5":  # encoder-decoder: no prefix cache; the encoder reads each distinct context once
        assert computed.calls == shared.calls == 0
    else:  # two prefixes (SHOTS, SHOTS + "...the mo"), each run once, then batches of <= 4 rows
        assert computed.calls == 2 and shared.calls >= 2
    for request, a, b in zip(requests, out, full):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert (a.tokens, a.greedy) == (b.tokens, b.greedy)
        if kind != "t5":  # and each row alone, unpadded, in one plain model(...) call
            context = lm.token_ids(request.context)
            whole = lm.token_ids(request.context + request.continuation)
            assert a.logprob == pytest.approx(by_hand(lm, context, whole[len(context):]), abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hidden_states_and_the_copying_path_agree(lms, kind):
    lm = lms[kind]
    requests = requests_for(CASES[:3])
    shared = lm.loglikelihood(requests, batch_size=3, hidden_layers=[1, 2])
    lm.share_prefix = False
    try:
        copied = lm.loglikelihood(requests, batch_size=3, hidden_layers=[1, 2])
    finally:
        del lm.share_prefix
    for a, b in zip(shared, copied):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.hidden == pytest.approx(b.hidden, abs=1e-5)


def test_a_model_wrapped_with_an_unmerged_lora_adapter_scores_the_same(lms):
    """PEFT's forward() has no position_ids parameter but passes them on: they must still be given."""
    import torch

    peft = pytest.importorskip("peft")
    lm = lms["llama"]
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(copy.deepcopy(lm.model), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, weights in wrapped.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity; make it change the keys and values
            weights.data.normal_(0, 0.5)
    adapted = HFLM("lora", wrapped.eval(), lm.tokenizer, "cpu")
    requests = requests_for(CASES[:3])
    full = adapted.loglikelihood(requests, batch_size=4, prefix_cache=False)
    out = adapted.loglikelihood(requests, batch_size=4)
    assert [o.logprob for o in out] == pytest.approx([f.logprob for f in full], abs=1e-5)
    assert [o.logprob for o in out] != pytest.approx([o.logprob for o in lm.loglikelihood(requests)], abs=1e-3)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_attention_equals_one_softmax_over_prefix_and_row(monkeypatch, fused, group):
    """The split attention against softmax([q k_prefix^T, q k_own^T] + mask) [v_prefix; v_own],
    with grouped-query heads, on random tensors; fused: torch's flash kernel for the prefix part."""
    import torch

    torch.manual_seed(0)
    batch, kv, width, past, dim = 3, 2, 5, 7, 8
    heads = kv * group
    if not fused:
        monkeypatch.setattr(shared_prefix, "FUSED", False)
    q = torch.randn(batch, heads, width, dim)
    k, v = torch.randn(batch, kv, width, dim), torch.randn(batch, kv, width, dim)
    pk, pv = torch.randn(1, kv, past, dim), torch.randn(1, kv, past, dim)
    real = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    ids = torch.zeros(batch, width, dtype=torch.long)
    own = shared_prefix.forward_kwargs(shared_prefix.Prefix([], past), ids, real)["attention_mask"]
    # causal, never onto padding, except that a padding position sees itself (so no query sees nothing)
    assert own[1, 0, 3].tolist() == [False, False, True, True, False] and own[1, 0, 1].tolist()[:2] == [False, True]

    class Layer:
        layer_idx = 0

    prefix = shared_prefix.Prefix([(pk, pv)], past)
    got, _ = shared_prefix.attention(Layer(), q, k, v, own, scaling=0.3, **{shared_prefix.KWARG: prefix})
    keys = torch.cat([pk.expand(batch, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([pv.expand(batch, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    mask = torch.cat([torch.ones(batch, 1, width, past, dtype=torch.bool), own], -1)
    scores = (q @ keys.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    want = (scores.softmax(-1) @ values).transpose(1, 2)
    assert got.shape == (batch, width, heads, dim)
    assert torch.allclose(got, want, atol=1e-6)


def test_the_models_attention_is_restored_after_a_call_even_a_failing_one(lms):
    lm = lms["llama"]
    before = lm.model.config._attn_implementation
    with pytest.raises(RuntimeError):
        with shared_prefix.active(lm.model):
            assert lm.model.config._attn_implementation == shared_prefix.NAME
            raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == before


def test_a_family_not_known_to_fit_keeps_the_copying_path(lms, monkeypatch):
    lm = lms["llama"]
    requests = requests_for(CASES[:3])
    expected = lm.loglikelihood(requests, batch_size=4, prefix_cache=False)
    monkeypatch.setattr(shared_prefix, "SUPPORTED", set())
    copied = Spy(monkeypatch, prefix_cache, "extend")
    monkeypatch.setattr(shared_prefix, "forward_kwargs", lambda *a, **k: pytest.fail("shared path used"))
    out = lm.loglikelihood(requests, batch_size=4)
    assert copied.calls >= 1
    assert [o.logprob for o in out] == pytest.approx([e.logprob for e in expected], abs=1e-5)


def test_a_prefix_is_computed_once_across_calls_and_few_are_kept(lms, monkeypatch):
    """classify calls loglikelihood once per chunk of items, with the same demonstrations."""
    lm = lms["llama"]
    lm._prefixes.clear()
    computed = Spy(monkeypatch, lm, "prefix_kv")
    requests = requests_for(CASES[:3])
    lm.loglikelihood(requests[:2], batch_size=4)
    out = lm.loglikelihood(requests, batch_size=4)
    assert computed.calls == 1
    expected = lm.loglikelihood(requests, batch_size=4, prefix_cache=False)
    assert [o.logprob for o in out] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    for n in range(6):  # six more prefixes: only the last _PREFIX_MEMO stay
        lm.loglikelihood(requests_for([(SHOTS + f"Review: number {n} was fine\n\n", t) for t in ("a", "b")]))
    assert computed.calls == 7 and len(lm._prefixes) == 4


def peak_bytes(run) -> int:
    """The most CPU memory torch held at once during run(), from the profiler's memory events."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_a_16_shot_batch_peaks_below_the_copying_version():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer("plain")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0)
    lm = HFLM("tiny", LlamaForCausalLM(config).eval(), tokenizer, "cpu")
    shots = "".join(f"Review: the movie number {n} was {'great' if n % 2 else 'dull'}\nSentiment: "
                    f"{'Positive' if n % 2 else 'Negative'}\n\n" for n in range(16))
    items = [f"Review: film {n} {'so ' * n}good\nSentiment:" for n in range(16)]
    requests = [models.LLRequest(shots + item, " Positive", prefix=shots) for item in items]
    assert len(lm.token_ids(shots)) > 16 * 20  # a long shared prefix, 16 rows in one batch

    shared = peak_bytes(lambda: lm.loglikelihood(requests, batch_size=16))
    lm.share_prefix = False
    copied = peak_bytes(lambda: lm.loglikelihood(requests, batch_size=16))
    # the copies alone: every row holds the whole prefix's keys and values in every layer
    prefix_kv = 4 * 2 * 2 * len(lm.token_ids(shots)) * 16 * 4
    assert copied - shared > 16 * prefix_kv / 2 and 2 * shared < copied, (shared, copied)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prefix_cache_runs_the_head_on_one_position_and_holds_the_same_keys(lms, kind):
    import torch

    lm = lms[kind]
    ids = lm.token_ids(SHOTS)
    seen = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        every = prefix_cache.compute(lm.model, ids, lm.device, lm.cache_kwarg())  # the head on every position
        kept = lm.prefix_kv(ids)  # the head on the last position only
    finally:
        hook.remove()
    assert seen == [len(ids), 1]
    for a, b in zip(every.layers, kept.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_rows_of_very_different_lengths_go_in_separate_batches_with_the_same_scores(lms, monkeypatch, kind):
    """Scoring cuts its length-sorted rows where padding the short ones would cost more than a pass."""
    from llmlab.backends import batching, hf_score

    lm = lms[kind]
    long = "Review: " + "a long and winding film that never ends, " * 6
    texts = [long + str(n) for n in range(3)] + [f"Review: ok {n}" for n in range(3)]
    requests = [models.LLRequest(SHOTS + f"{t}\nSentiment:", LABELS[0], prefix=SHOTS) for t in texts]
    passes = Spy(monkeypatch, hf_score, "seq2seq" if kind == "t5" else "causal")
    cut = lm.loglikelihood(requests, batch_size=16)
    assert passes.calls == 2  # the long rows, then the short ones (one batch each without the cut)
    for device in batching.PASS_TOKENS:  # a pass dearer than any padding: one batch
        monkeypatch.setitem(batching.PASS_TOKENS, device, 10**9)
    whole = lm.loglikelihood(requests, batch_size=16)
    assert passes.calls == 3
    assert [o.logprob for o in cut] == pytest.approx([o.logprob for o in whole], abs=1e-5)
