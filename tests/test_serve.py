"""`llmlab serve` on a FakeLM, on loopback in a thread: the error statuses and bodies, the API key,
the caps, request batching, and llmlab's /v1/classify answering as `llmlab classify` does. One server
for the module (tests/test_serve_openai.py runs the official openai client on a real tiny model)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import invoke, jsonl  # noqa: E402
from llmlab.backends.fake import CharTokenizer, FakeLM  # noqa: E402
from llmlab.core.config import ModelConfig, ServeConfig  # noqa: E402

KEY = "sekret"


@contextlib.contextmanager
def running(lm, **options):
    """The app serving `lm` on a free loopback port: yields (base URL, app)."""
    from llmlab.serving.app import create_app
    from llmlab.serving.server import uvicorn_server

    app = create_app(lm, ServeConfig(ModelConfig(), port=0, **options))
    server = uvicorn_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.batcher.close()


def call(url, path, body=None, key=KEY, raw=None, method=None):
    """(status, parsed JSON body) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class SlowLM(FakeLM):
    """With `delay` set, the next model call takes that long, so requests sent meanwhile queue up."""

    delay = 0.0

    def prompt_logprobs(self, prompts, top=1, batch_size=16):
        delay, self.delay = self.delay, 0.0
        time.sleep(delay)
        return super().prompt_logprobs(prompts, top, batch_size)


@pytest.fixture(scope="module")
def served():
    lm = SlowLM(default="hello world", tokenizer=CharTokenizer(chat_template="chat"))
    with running(lm, api_key=KEY, max_tokens=50, max_n=2, max_body_bytes=3000, max_prompt_tokens=200) as (url, app):
        yield url, app, lm


ERRORS = [  # (path, body or raw bytes, key, status, words in the message)
    ("/v1/completions", b"{bad json", KEY, 400, "not valid JSON"),
    ("/v1/completions", {"prompt": 3}, KEY, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, KEY, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, KEY, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, KEY, 400, "empty"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, KEY, 404, "'gpt-4' is not served here"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 51}, KEY, 400, "cap of 50"),
    ("/v1/completions", {"prompt": "a", "n": 3, "temperature": 1}, KEY, 400, "n 3 is over"),
    ("/v1/completions", {"prompt": "a" * 201}, KEY, 400, "201 tokens, over this server's cap of 200"),
    ("/v1/completions", {"prompt": "a" * 4000}, KEY, 413, "over this server's cap of 3000 bytes"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, KEY, 400, "add echo"),
    ("/v1/completions", {"prompt": "a"}, None, 401, "API key"),
    ("/v1/models", None, "wrong", 401, "API key"),
    ("/v1/chat/completions", {"messages": []}, KEY, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, KEY, 400, "role"),
    ("/v1/classify", {"template": "../mine.yaml", "text": "x"}, KEY, 400, "by name only"),
    ("/v1/classify", {"template": "no-such", "text": "x"}, KEY, 400, "no template named 'no-such'"),
    ("/v1/classify", {"template": "sentiment", "text": "x", "shot": 2}, KEY, 400, "shot"),
    ("/v1/classify", {"template": "sentiment", "text": "x", "calibration": "magic"}, KEY, 400, "magic"),
    ("/v1/nothing", {}, KEY, 404, "Not Found"),
    # llmlab's own endpoints: the same caps as /v1/completions
    ("/v1/generate", {"text": "a", "settings": {"max_new_tokens": 51}}, KEY, 400, "max_new_tokens 51 is over"),
    ("/v1/generate", {"text": "a", "settings": {"num_beams": 3, "max_new_tokens": 5}}, KEY, 400, "num_beams 3 is over"),
    ("/v1/generate_text", {"requests": [{"prompt": "a"}], "settings": {"max_new_tokens": 51}}, KEY, 400,
     "max_new_tokens 51 is over this server's cap of 50"),
    ("/v1/generate_text", {"requests": [{"prompt": "a"}], "settings": {"num_return_sequences": 3, "do_sample": True,
                                                                       "max_new_tokens": 5}}, KEY, 400,
     "num_return_sequences 3 is over"),
    ("/v1/generate_text", {"requests": [{"prompt": "a" * 201}], "settings": {"max_new_tokens": 5}}, KEY, 400,
     "201 tokens, over this server's cap"),
    ("/v1/generate_text", {"requests": [{"prompt": "a"}] * 3, "settings": {"max_new_tokens": 5}}, KEY, 400,
     "3 prompts are over"),
    ("/v1/generate_text", {"requests": [{"prompt": "a"}]}, None, 401, "API key"),
    ("/v1/tokenizer", {"op": "decode", "ids": [10**12]}, KEY, 400, "not in the vocabulary"),
    ("/v1/tokenizer", {"op": "tokens", "ids": [-5]}, KEY, 400, "token id -5 is not in the vocabulary"),
]


@pytest.mark.parametrize("path, body, key, status, words", ERRORS)
def test_errors_have_their_status_and_openai_body(served, path, body, key, status, words):
    url, _, _ = served
    got, reply = call(url, path, None if isinstance(body, bytes) else body, key,
                      raw=body if isinstance(body, bytes) else None)
    assert got == status
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert words in reply["error"]["message"]
    assert "Traceback" not in reply["error"]["message"]


def test_health_models_and_a_completion(served):
    url, _, _ = served
    assert call(url, "/health") == (200, {"status": "ok", "model": "fake"})
    assert [m["id"] for m in call(url, "/v1/models")[1]["data"]] == ["fake"]
    status, reply = call(url, "/v1/completions", {"prompt": ["ab", "cd"], "max_tokens": 5, "temperature": 0,
                                                  "model": "fake"})
    assert status == 200
    assert [(c["index"], c["text"], c["finish_reason"]) for c in reply["choices"]] == [
        (0, "hello", "length"), (1, "hello", "length")]
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}


def test_echo_logprobs_are_the_prompt_tokens_scores_as_lm_eval_reads_them(served):
    """max_tokens 1 + echo + logprobs (lm-eval's local-completions): every prompt token scored (the
    first has none), then one greedy token, which lm-eval drops ([ctxlen:-1])."""
    url, _, lm = served
    ids = [100, 101, 102, 103]
    status, reply = call(url, "/v1/completions", {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                  "temperature": 0})
    assert status == 200
    expected = lm.prompt_logprobs([ids])[0]
    got = reply["choices"][0]["logprobs"]
    assert got["tokens"] == ["a", "b", "c", "d", "e"]
    assert got["token_logprobs"] == [None] + [t.logprob for t in expected.tokens] + [expected.next[0][2]]
    assert got["top_logprobs"][0] is None and got["top_logprobs"][1] == {"b": expected.tokens[0].logprob}
    assert reply["choices"][0]["text"] == "abcde"


def test_requests_sent_together_share_one_model_call(served):
    url, app, lm = served
    calls = app.state.batcher.calls
    lm.delay = 1.0
    prompts = [[100 + k, 101 + k, 102 + k] for k in range(5)]
    replies: dict[int, dict] = {}

    def send(k: int) -> None:
        replies[k] = call(url, "/v1/completions", {"prompt": prompts[k], "max_tokens": 0, "echo": True,
                                                   "logprobs": 0})[1]

    threads = [threading.Thread(target=send, args=(k,)) for k in range(5)]
    threads[0].start()
    time.sleep(0.3)  # the first is in the (slow) model; the other four queue meanwhile
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert app.state.batcher.calls - calls <= 2  # the four that waited went in one call
    for k in range(5):  # each got its own prompt's scores back
        assert replies[k]["choices"][0]["logprobs"]["tokens"] == [chr(i - 3) for i in prompts[k]]


def test_classify_endpoint_answers_as_llmlab_classify(served, fake_lm, tmp_path):
    """The same template, shots and calibration: the same records as `llmlab classify` in-process
    (its FakeLM scores like the server's: a hash of prompt and label)."""
    url, _, _ = served
    texts = ["a good film", "a bad film", "fine"]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    local = invoke(["classify", "-t", "sentiment", "-i", data, "--shots", "2", "--calibration", "contextual",
                    "-f", "jsonl"])
    assert local.exit_code == 0, local.stderr
    status, reply = call(url, "/v1/classify", {"template": "sentiment", "inputs": [{"text": t} for t in texts],
                                               "shots": 2, "calibration": "contextual"})
    assert status == 200
    assert reply["calibration"] == "contextual" and reply["labels"] == ["positive", "negative"]
    assert reply["results"] == jsonl(local.stdout)


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines in: give --api-key KEY (or LLMLAB_API_KEY), or "
                            "serve on 127.0.0.1"),
    (["--port", "70000"], "invalid --port 70000: give 1-65535 (0 = any free port)"),
    (["--max-tokens", "0"], "invalid --max-tokens 0: must be >= 1"),
    (["--batch-wait", "-1"], "invalid --batch-wait -1.0: must be >= 0 milliseconds"),
])
def test_serve_mistakes_fail_before_the_model_loads(no_model, args, message):
    result = invoke(["serve", *args])
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")


def test_a_body_sent_in_chunks_is_capped_too(served):
    """No Content-Length to check up front: the body is counted as it arrives."""
    import http.client

    url, _, _ = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "a" * 4000}).encode()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", body=iter([body[:1000], body[1000:]]), encode_chunked=True,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = connection.getresponse()
    assert reply.status == 413
    assert "over this server's cap of 3000 bytes" in json.loads(reply.read())["error"]["message"]


def test_32_concurrent_clients_all_get_their_own_answers(served):
    """A bounded load test on loopback: 32 clients x 4 requests, no errors, nothing crossed over."""
    from concurrent.futures import ThreadPoolExecutor

    url, _, _ = served

    def ask(k: int) -> bool:
        ids = [100 + k % 50, 101 + k % 50]
        status, reply = call(url, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
        return status == 200 and reply["choices"][0]["logprobs"]["tokens"] == [chr(i - 3) for i in ids]

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(ask, range(128)))
