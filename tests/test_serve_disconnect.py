"""A client that disconnects frees its slot: its queued model calls are dropped and a generation
that only it waits for stops (between decode steps on a real model). Real sockets, really closed."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llmlab.backends.fake import FakeLM  # noqa: E402
from test_serve import call, running  # noqa: E402


class Lingering(FakeLM):
    """Generating for the prompt "linger" takes up to 60 s, unless nobody wants it any more."""

    def generate(self, requests, settings, batch_size=8, on_output=None, stream=None, engine="auto"):
        started = time.monotonic()
        while requests[0].prompt == "linger" and time.monotonic() - started < 60:
            if self.should_stop is not None and self.should_stop():
                break
            time.sleep(0.02)
        self.lingered.append(round(time.monotonic() - started, 1))
        return super().generate(requests, settings, batch_size, on_output, stream, engine)


def send(url: str, body: dict) -> http.client.HTTPConnection:
    """A request sent and its answer not read: the caller hangs up (close) or reads it."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_hangs_up_stops_its_generation_and_its_queued_work():
    lm = Lingering(default="hello world")
    lm.lingered = []
    with running(lm) as (url, app):
        batcher = app.state.batcher
        first = send(url, {"prompt": "linger", "max_tokens": 5})
        assert wait_for(lambda: batcher.calls == 1)  # the generation is running
        queued = send(url, {"prompt": "quick", "max_tokens": 6})  # other settings: queued behind it, not merged
        time.sleep(0.3)
        queued.close()  # gone while queued
        time.sleep(0.3)
        first.close()  # gone while its generation runs
        assert wait_for(lambda: batcher.stopped == 1 and batcher.dropped == 1), (batcher.stopped, batcher.dropped)
        assert lm.lingered[0] < 10  # stopped at once, not after the minute it would have taken
        status, reply = call(url, "/v1/completions", {"prompt": "quick", "max_tokens": 5})  # the slot is free
        assert status == 200 and reply["choices"][0]["text"] == "hello"
        assert batcher.calls == 2 and lm.lingered[1:] == [0.0]  # "quick" ran once: the dropped copy never did


def test_a_client_that_stays_gets_its_answer_even_when_a_merged_one_leaves():
    lm = Lingering(default="hello world")
    lm.lingered = []
    with running(lm, batch_wait_ms=300) as (url, app):
        staying = send(url, {"prompt": "quick", "max_tokens": 5})
        leaving = send(url, {"prompt": "quick", "max_tokens": 5})  # the same settings: one merged call
        leaving.close()
        reply = staying.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["choices"][0]["text"] == "hello"
        assert app.state.batcher.stopped == 0


@pytest.mark.slow
def test_a_real_generation_stops_between_decode_steps(tiny_models):
    from llmlab.backends import models

    lm = models.load(str(tiny_models["llama"]), "cpu", "float32")
    lm.model.generation_config.eos_token_id = None  # no early end: left alone it would run all 1500 steps
    with running(lm, max_tokens=1500) as (url, app):
        batcher = app.state.batcher
        gone = send(url, {"prompt": "once upon a time", "max_tokens": 1500})
        assert wait_for(lambda: batcher.calls == 1)  # its generation (one batch: 1500 decode steps) has started
        time.sleep(1)
        left = time.monotonic()
        gone.close()
        assert wait_for(lambda: batcher.stopped == 1, 30), (batcher.calls, batcher.stopped)
        assert time.monotonic() - left < 10  # stopped between decode steps, long before its 1500 tokens


@pytest.mark.slow
def test_continuous_batching_stops_between_decode_steps(tiny_models):
    """--gen-engine continuous: LM.should_stop is asked while generate_batch's manager decodes, not
    only between batches: the rows stop part way and the call raises Cancelled."""
    from llmlab.backends import hf_continuous, models
    from llmlab.backends.base import Cancelled
    from llmlab.core.settings import build

    lm = models.load(str(tiny_models["llama"]), "cpu", "float32")
    lm.model.generation_config.eos_token_id = None
    steps, real = [], lm.model.forward
    lm.model.forward = lambda *a, **k: steps.append(time.sleep(0.002)) or real(*a, **k)  # a step: >= 2 ms
    asked = []
    lm.should_stop = lambda: asked.append(len(steps)) or len(steps) >= 20  # gone after 20 decode steps
    rows = [lm.token_ids("once upon a time"), lm.token_ids("the movie was")]
    with pytest.raises(Cancelled):
        hf_continuous.generate_rows(lm, rows, build({"max_new_tokens": 1500}), [], set(), None)
    assert 20 <= len(steps) < 200, len(steps)  # stopped soon after, far from its 1500 steps
    lm.should_stop = None
    out = hf_continuous.generate_rows(lm, rows, build({"max_new_tokens": 5}), [], set(), None)
    assert [o.completion_tokens for o in out] == [[5], [5]]  # with nobody leaving: to the end, as before


@pytest.mark.slow
def test_a_real_continuous_generation_stops_when_its_client_leaves(tiny_models):
    from llmlab.backends import models

    lm = models.load(str(tiny_models["llama"]), "cpu", "float32")
    lm.model.generation_config.eos_token_id = None
    real = lm.model.forward
    lm.model.forward = lambda *a, **k: time.sleep(0.01) or real(*a, **k)  # 1500 steps: 15 s at least
    with running(lm, max_tokens=1500) as (url, app):
        batcher = app.state.batcher
        parts = urlsplit(url)
        gone = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        gone.request("POST", "/v1/generate", json.dumps({"inputs": [{"prompt": "once upon a time"}],
                                                         "settings": {"max_new_tokens": 1500},
                                                         "gen_engine": "continuous"}),
                     {"Content-Type": "application/json"})
        assert wait_for(lambda: batcher.calls == 1)
        time.sleep(1)
        left = time.monotonic()
        gone.close()
        assert wait_for(lambda: batcher.stopped == 1, 30), (batcher.calls, batcher.stopped)
        assert time.monotonic() - left < 4  # stopped between decode steps, long before its 1500 tokens
