"""The OpenAI completions and chat API over the LM interface: request bodies (pydantic), their
checks (caps, the context window), the generation settings they ask for, and the response bodies.
`echo` + `logprobs` scores the prompt's own tokens (LM.prompt_logprobs), as lm-evaluation-harness's
`local-completions` reads them: token_logprobs[ctxlen:-1] summed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sized
from typing import TYPE_CHECKING, Literal, Optional, Sequence, TypedDict, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from llmlab.serving.errors import APIError

if TYPE_CHECKING:
    from llmlab.backends.base import LM, PromptScores, TokenLogprob
    from llmlab.core.config import ServeConfig
    from llmlab.core.settings import GenerationSettings

Number = Union[StrictInt, float]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields llmlab does not use (user, ...)

    model: Optional[StrictStr] = None
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=0)
    stream: StrictBool = False


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    echo: StrictBool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


# ---------------------------------------------------------------- response bodies


class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class ChatTop(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatToken(ChatTop):
    top_logprobs: list[ChatTop]


class ChatLogprobs(TypedDict):
    content: list[ChatToken]


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]


class ChatMessage(TypedDict):
    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: str


class DeltaChoice(TypedDict):
    """A streamed chat chunk's choice: delta is {"role", "content"} first, then {"content"}, then {}."""

    index: int
    delta: dict[str, str]
    logprobs: None
    finish_reason: Optional[str]


Choice = Union[CompletionChoice, ChatChoice, DeltaChoice]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Envelope(TypedDict):
    id: str
    object: str
    created: int
    model: str
    choices: Sequence[Choice]


class Envelope(_Envelope, total=False):
    usage: Usage


def settings(body: _Body, max_tokens: int, logprobs: Optional[int]) -> GenerationSettings:
    """The generation settings a request asks for: temperature 0 is greedy; n > 1 needs sampling
    (greedy n > 1 is one completion repeated, as OpenAI's API does)."""
    from llmlab.core.errors import UsageError
    from llmlab.core.settings import GenerationSettings

    sample = body.temperature > 0
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return GenerationSettings(max_new_tokens=max(1, max_tokens), do_sample=sample,
                                  temperature=float(body.temperature), top_p=float(body.top_p), num_return_sequences=body.n if sample else 1,
                                  seed=body.seed, stop=stops, logprobs=logprobs is not None,
                                  top_logprobs=logprobs or 0).validate()
    except UsageError as exc:
        raise APIError(400, str(exc).replace("--", "")) from None


def check_caps(body: _Body, max_tokens: int, limits: ServeConfig) -> None:
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {limits.max_tokens}",
                       param="max_tokens")
    if body.n > limits.max_n:
        raise APIError(400, f"n {body.n} is over this server's cap of {limits.max_n}", param="n")


def check_settings(settings: GenerationSettings, limits: ServeConfig) -> None:
    """llmlab's own endpoints take generation settings by name: the same caps as max_tokens and n."""
    if settings.max_new_tokens > limits.max_tokens:
        raise APIError(400, f"max_new_tokens {settings.max_new_tokens} is over this server's cap of "
                       f"{limits.max_tokens}", param="settings.max_new_tokens")
    for name in ("num_beams", "num_return_sequences"):
        if getattr(settings, name) > limits.max_n:
            raise APIError(400, f"{name} {getattr(settings, name)} is over this server's cap of {limits.max_n}",
                           param=f"settings.{name}")


def check_prompt(ids: list[int], max_tokens: int, window: Optional[int], cap: int) -> None:
    """A prompt must be non-empty, within the prompt-token cap, and leave room in the window."""
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) > cap:
        raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's cap of {cap}",
                       param="prompt", code="context_length_exceeded")
    if window is not None and len(ids) + max_tokens > window:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is over the model's "
                       f"context window of {window} tokens", param="prompt", code="context_length_exceeded")


def prompts_of(body: CompletionBody, lm: LM) -> list[tuple[str, list[int], bool]]:
    """(text, token ids, given as ids) per prompt. Text is tokenized as the model's plain prompts are;
    token ids are used as they are (and decoded to text to generate from)."""
    raw = body.prompt
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if isinstance(raw[0], int):
        raw = [raw]
    vocab = len(lm.tokenizer) if isinstance(lm.tokenizer, Sized) else None
    out = []
    for p in raw:
        if isinstance(p, str):
            out.append((p, lm.token_ids(p), False))
            continue
        if vocab is not None and any(not 0 <= i < vocab for i in p):
            raise APIError(400, f"a prompt token id is outside the model's vocabulary (0-{vocab - 1})", param="prompt")
        out.append((lm.tokenizer.decode(list(p)), list(p), True))
    return out


def _top_dict(token: TokenLogprob) -> dict[str, float]:
    """Most likely first; two tokens with the same text keep the likelier one's value."""
    top: dict[str, float] = {}
    for text, _, lp in token.top or [(token.text, token.id, token.logprob)]:
        top.setdefault(text, lp)
    return top


def completion_logprobs(echoed: Optional[PromptScores], first: str, generated: Sequence[TokenLogprob],
                        start: int = 0) -> CompletionLogprobs:
    """OpenAI's completion `logprobs`: the prompt's tokens (echo: the first has no log-probability),
    then the generated ones; top_logprobs maps token text to log-probability."""
    tokens: list[str] = []
    values: list[Optional[float]] = []
    tops: list[Optional[dict[str, float]]] = []
    if echoed is not None:
        tokens.append(first)
        values.append(None)
        tops.append(None)
        for t in echoed.tokens:
            tokens.append(t.text)
            values.append(t.logprob)
            tops.append(_top_dict(t))
    for t in generated:
        tokens.append(t.text)
        values.append(t.logprob)
        tops.append(_top_dict(t))
    offsets, at = [], start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(generated: Sequence[TokenLogprob]) -> ChatLogprobs:
    def entry(text: str, lp: float) -> ChatTop:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(x, lp) for x, _, lp in t.top]}
                        for t in generated]}


def envelope(kind: str, model: str, choices: Sequence[Choice], usage: Optional[Usage] = None) -> Envelope:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    body: Envelope = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                      "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt: int, completion: int) -> Usage:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
