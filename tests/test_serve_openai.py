"""The official openai Python client against `llmlab serve` on a real tiny random model: completions,
chat, streaming and logprobs agree with the model run in-process; echo + logprobs gives the
log-likelihoods lm-evaluation-harness reads (its own parser, when it is installed). And a real
`llmlab serve` process finishes the request in flight on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve import running  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from llmlab.backends import models

    return models.load(str(tiny_models["llama-chat"]), "cpu", "float32")


@pytest.fixture(scope="module")
def url(tiny):
    with running(tiny) as (address, _):
        yield address


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def in_process(lm, text, templated=False, **settings):
    from llmlab.backends.base import GenRequest
    from llmlab.core.settings import GenerationSettings

    return lm.generate([GenRequest(text, templated)], GenerationSettings(**settings).validate(), batch_size=1)[0]


def test_completion_is_the_in_process_greedy_completion(client, tiny):
    reply = client.completions.create(model=tiny.name, prompt="the movie was", max_tokens=5, temperature=0)
    assert reply.choices[0].text == in_process(tiny, "the movie was", max_new_tokens=5).completions[0]
    assert reply.usage.prompt_tokens == len(tiny.token_ids("the movie was"))


def test_echo_logprobs_are_the_loglikelihood_lm_eval_reads(client, tiny):
    """lm-eval's local-completions: token ids in, max_tokens 1, echo, logprobs 1; it sums
    token_logprobs[ctxlen:-1] and checks greediness against top_logprobs."""
    from llmlab.backends.base import LLRequest

    context, continuation = "the movie was great and", " I loved it"
    ctx = tiny.token_ids(context)
    whole = tiny.token_ids(context + continuation)
    assert whole[: len(ctx)] == ctx
    reply = client.completions.create(model=tiny.name, prompt=[whole], max_tokens=1, echo=True, logprobs=1,
                                      temperature=0)
    expected = tiny.loglikelihood([LLRequest(context, continuation)])[0]
    choice = reply.choices[0].model_dump()
    assert len(choice["logprobs"]["token_logprobs"]) == len(whole) + 1
    assert sum(choice["logprobs"]["token_logprobs"][len(ctx):-1]) == pytest.approx(expected.logprob, abs=1e-4)
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    parsed = lm_eval.LocalCompletionsAPI.parse_logprobs(reply.model_dump(), ctxlens=[len(ctx)])
    assert parsed[0][0] == pytest.approx(expected.logprob, abs=1e-4)
    assert parsed[0][1] == expected.greedy


def test_lm_eval_local_completions_end_to_end(url, tiny):
    """lm-eval's own client finds the server's tokenizer (/tokenizer_info, /tokenize) and scores
    loglikelihood requests through /v1/completions: the same numbers and greediness as in-process."""
    from llmlab.backends.base import LLRequest

    api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    harness = api.LocalCompletionsAPI(base_url=url + "/v1/completions", model=tiny.name, batch_size=2)
    assert harness.tokenizer.encode(" I loved it") == tiny.continuation_ids(" I loved it")
    pairs = [("the movie was great and", " I loved it"), ("the film was", " terrible")]
    got = harness.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=n) for n, p in enumerate(pairs)],
                                disable_tqdm=True)
    expected = tiny.loglikelihood([LLRequest(*p) for p in pairs])
    assert [g[0] for g in got] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert [g[1] for g in got] == [e.greedy for e in expected]


def test_chat_streaming_and_logprobs(client, tiny):
    messages = [{"role": "user", "content": "Where is Ganymede?"}]
    text = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = in_process(tiny, text, templated=True, max_new_tokens=6, logprobs=True, top_logprobs=2)
    reply = client.chat.completions.create(model=tiny.name, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert reply.choices[0].message.content == expected.completions[0]
    tokens = reply.choices[0].logprobs.content
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in expected.logprobs[0]], abs=1e-5)
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    stream = client.chat.completions.create(model=tiny.name, messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.completions[0]
    assert chunks[-1].choices[0].finish_reason == expected.finish_reasons[0]


def test_a_token_id_outside_the_vocabulary_is_a_400(client, tiny):
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        client.completions.create(model=tiny.name, prompt=[[5, 10**6]], max_tokens=1)


def test_sampling_with_a_seed_repeats(client, tiny):
    ask = dict(model=tiny.name, prompt="the film", max_tokens=6, temperature=1.0, seed=7, n=2)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2


def test_sigterm_finishes_the_request_in_flight(tiny_models):
    """A real `llmlab serve`: SIGTERM while a completion streams; the client still gets all of it and
    the server exits 0."""
    env = {**os.environ, "LLMLAB_LOG": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", "-m", str(tiny_models["llama-chat"]),
                             "--device", "cpu", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        url = line.split(" at ")[1].split("/v1")[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        stream = client.completions.create(model=name, prompt="the movie", max_tokens=60, temperature=0, stream=True)
        pieces = [next(iter(stream)).choices[0].text]
        threading.Thread(target=proc.send_signal, args=(signal.SIGTERM,)).start()
        pieces += [c.choices[0].text for c in stream]
        assert proc.wait(timeout=60) == 0
        assert pieces[-1] == "" and len(pieces) > 2  # the final chunk (finish reason) arrived
    finally:
        proc.kill()
