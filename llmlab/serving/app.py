"""The HTTP app: FastAPI routes over one loaded model. Every error leaves as OpenAI's error body with
its status (400 bad request, 401 no key, 404 unknown model or route, 413 body too big, 500 our
fault) and never as a traceback. Every model call goes through the batcher's queue."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmlab.core.config import ServeConfig
from llmlab.core.errors import LlmlabError
from llmlab.serving import completions, eval_api, lab_api, llmlab_api, openai_api as api
from llmlab.backends.base import Cancelled
from llmlab.serving.batcher import CANCEL, Batcher, QueuedLM
from llmlab.serving.errors import APIError, error_body

if TYPE_CHECKING:
    from llmlab.backends.base import LM, GenOutput, GenRequest
    from llmlab.core.settings import GenerationSettings

# A streamed piece of text, the finished output, or what went wrong (see _sse).
_Event = Union[str, "GenOutput", Exception]

_log = logging.getLogger("llmlab")


class Guard:
    """Before any route: the API key (401) and the body size (413, also for bodies sent without a
    Content-Length). During: a client that disconnects before its answer sets the request's
    batcher.CANCEL event (its queued model calls are dropped, a generation it alone waits for stops).
    After: an unexpected error becomes a 500 body and one log line."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
            return await _reply(send, 401, "this server needs its API key: send the header "
                                "'Authorization: Bearer KEY'", code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await _reply(send, 413, self._too_big())
        seen, started, answered = 0, False, False
        cancel, body_read = threading.Event(), asyncio.Event()
        token = CANCEL.set(cancel)

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, self._too_big())
            if message["type"] == "http.disconnect":
                cancel.set()
            elif not message.get("more_body"):
                body_read.set()
            return message

        async def watched(message: Message) -> None:
            nonlocal started, answered
            started = started or message["type"] == "http.response.start"
            answered = answered or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        async def watch() -> None:  # once the body is in, the next message is the client leaving (or done)
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answered:
                cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, limited, watched)
        except Cancelled:
            _log.info(f"{scope.get('path')}: the client disconnected; its work was stopped")
        except Exception as exc:  # noqa: BLE001 - no traceback leaves the server
            _log.error(f"{scope.get('path')}: {type(exc).__name__}: {exc}")
            if not started:
                await _reply(send, 500, f"internal error: {type(exc).__name__}")
        finally:
            answered = True
            watcher.cancel()
            CANCEL.reset(token)

    def _too_big(self) -> str:
        return f"the request body is over this server's cap of {self.max_body} bytes"


async def _reply(send: Send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where or 'body'}: {first.get('msg', 'invalid value')}"


def _errors(app: FastAPI) -> None:
    def respond(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    app.add_exception_handler(APIError, lambda r, e: respond(e.status, e.message, e.param, e.code))
    app.add_exception_handler(LlmlabError, lambda r, e: respond(400, str(e)))
    app.add_exception_handler(RequestValidationError, lambda r, e: respond(400, _validation_message(e)))
    app.add_exception_handler(HTTPException, lambda r, e: respond(e.status_code, str(e.detail)))


def create_app(lm: LM, cfg: ServeConfig) -> FastAPI:
    """The app serving `lm` (an LM); cfg: its caps, key and model options (chat, for classify)."""
    batcher = Batcher(lm, wait_s=cfg.batch_wait_ms / 1000)
    name = lm.name
    names = {name, cfg.model.spec or "smollm2"}
    created = int(time.time())
    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.add_middleware(Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes)
    _errors(app)

    def model(requested: str | None) -> QueuedLM:
        if requested is not None and requested not in names:
            raise APIError(404, f"the model '{requested}' is not served here; this server serves '{name}'",
                           param="model", code="model_not_found")
        return QueuedLM(batcher)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmlab"}]}

    @app.post("/v1/completions", response_model=None)
    async def complete(body: api.CompletionBody) -> api.Envelope | StreamingResponse:
        served = model(body.model)
        if body.stream:
            return _stream_completion(body, served, cfg, name)
        return await run_in_threadpool(completions.completions, body, served, cfg, name)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: api.ChatBody) -> api.Envelope | StreamingResponse:
        served = model(body.model)
        if body.stream:
            if body.n > 1:
                raise APIError(400, "stream sends one completion: use n 1", param="n")
            request, st, _ = completions.chat_request(body, served, cfg)
            def chunk(delta: dict[str, str], finish: Optional[str]) -> api.Envelope:
                return api.envelope("chat.completion.chunk", name,
                                    [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

            return _sse(served, request, st,
                        lambda piece, finish: chunk({"content": piece} if piece is not None else {}, finish),
                        first=chunk({"role": "assistant", "content": ""}, None))
        return await run_in_threadpool(completions.chat, body, served, cfg, name)

    _tokenizer_routes(app, lm)
    llmlab_api.register(app, model, cfg)
    lab_api.register(app, model, cfg)
    from llmlab.orchestration.evaluate import model_facts

    eval_api.register(app, model, cfg, model_facts(lm))
    return app


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[StrictInt]


def _tokenizer_routes(app: FastAPI, lm: LM) -> None:
    """vLLM's tokenizer endpoints, which lm-evaluation-harness finds by itself (its remote tokenizer):
    then local-completions needs no tokenizer folder of its own."""
    tokenizer = lm.tokenizer

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict:
        return {name: getattr(tokenizer, name, None) for name in ("eos_token", "bos_token", "pad_token",
                                                                  "chat_template")} | {"model_max_length": lm.window}

    @app.post("/tokenize")
    def tokenize(body: TokenizeBody) -> dict:
        ids = lm.token_ids(body.prompt) if body.add_special_tokens else lm.continuation_ids(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": lm.window}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeBody) -> dict:
        return {"prompt": tokenizer.decode(body.tokens)}


def _stream_completion(body: api.CompletionBody, lm: LM, cfg: ServeConfig, name: str) -> StreamingResponse:
    from llmlab.backends.base import GenRequest

    prompts = api.prompts_of(body, lm)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if len(prompts) > 1 or body.n > 1 or body.echo or body.logprobs is not None or max_tokens < 1:
        raise APIError(400, "stream sends one completion of one prompt, without echo or logprobs", param="stream")
    api.check_caps(body, max_tokens, cfg)
    text, ids, as_ids = prompts[0]
    api.check_prompt(ids, max_tokens, lm.window, cfg.prompt_cap(lm.window))
    return _sse(lm, GenRequest(text, as_ids), api.settings(body, max_tokens, None), lambda piece, finish: api.envelope(
        "text_completion", name, [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]))


def _sse(lm: LM, request: GenRequest, st: GenerationSettings,
         chunk: Callable[[Optional[str], Optional[str]], api.Envelope],
         first: Optional[api.Envelope] = None) -> StreamingResponse:
    """Server-sent events: `first` (if any), a chunk per streamed piece, one with the finish reason,
    then [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[_Event] = asyncio.Queue()

    def put(value: _Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, value)

    def work() -> None:
        try:
            put(lm.generate([request], st, batch_size=1, stream=put)[0])
        except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
            put(exc)

    # The request's context (its batcher.CANCEL event) goes with the work: a client that leaves stops it.
    threading.Thread(target=contextvars.copy_context().run, args=(work,), name="llmlab-stream", daemon=True).start()

    async def events() -> AsyncIterator[str]:
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            value = await queue.get()
            if isinstance(value, str):  # a piece
                yield f"data: {json.dumps(chunk(value, None))}\n\n"
                continue
            if not isinstance(value, Exception):  # the end
                yield f"data: {json.dumps(chunk(None, value.finish_reasons[0]))}\n\n"
            else:
                status = 400 if isinstance(value, (LlmlabError, APIError)) else 500
                yield f"data: {json.dumps(error_body(status, str(value)))}\n\n"
            yield "data: [DONE]\n\n"
            return

    return StreamingResponse(events(), media_type="text/event-stream")
