"""/v1/tokenizer and /v1/generate_text: what `llmlab lab --server` needs of the served model. The
lab builds its prompts on the client, as in-process, with the served tokenizer (serving.remote's
RemoteTokenizer asks /v1/tokenizer: encode with offsets, decode, id -> token, the chat template,
and the tokenizer's facts), then has the prompt's exact text completed by /v1/generate_text.
/v1/next walks its /next (templated: true for text that already went through the chat template)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sized
from typing import TYPE_CHECKING, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, StrictStr

from llmlab.serving.errors import APIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmlab.backends.base import LM
    from llmlab.core.config import ServeConfig


class TokenizerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    op: Literal["facts", "encode", "decode", "tokens", "chat"]
    text: Optional[StrictStr] = None  # encode
    add_special_tokens: StrictBool = True
    offsets: StrictBool = False
    ids: Optional[list[StrictInt]] = None  # decode, tokens
    skip_special_tokens: StrictBool = False
    clean_up_tokenization_spaces: Optional[StrictBool] = None
    messages: Optional[list[dict[str, StrictStr]]] = None  # chat
    add_generation_prompt: StrictBool = False


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr  # the exact text the model sees
    templated: StrictBool = False  # it went through the chat template: the tokenizer adds no special tokens


class GenerateTextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    requests: list[TextRequest] = Field(min_length=1)
    settings: dict[str, JsonValue] = {}  # generation settings by name, as GenerationSettings holds them


def _need(value: Optional[object], param: str, op: str) -> object:
    if value is None:
        raise APIError(400, f"op '{op}' needs {param}", param=param)
    return value


def run_tokenizer(body: TokenizerBody, lm: LM) -> dict[str, JsonValue]:
    """One tokenizer call, answered as transformers answers it (lists for tensors)."""
    tok = lm.tokenizer
    if body.op == "facts":
        added = getattr(tok, "added_tokens_decoder", None) or {}
        return {"name": lm.name, "window": lm.window, "is_encoder_decoder": lm.is_encoder_decoder,
                "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "eos_token": tok.eos_token,
                "chat_template": getattr(tok, "chat_template", None),
                "all_special_ids": [int(i) for i in getattr(tok, "all_special_ids", [])],
                "special_added_ids": [int(i) for i, t in added.items() if getattr(t, "special", False)]}
    if body.op == "encode":
        text = str(_need(body.text, "text", body.op))
        kwargs = {"return_offsets_mapping": True} if body.offsets else {}
        encoded = tok(text, add_special_tokens=body.add_special_tokens, **kwargs)
        out: dict[str, JsonValue] = {"input_ids": [int(i) for i in encoded["input_ids"]]}
        if body.offsets:
            spans: object = encoded["offset_mapping"]  # (start, end) per token (the protocol types ids only)
            assert isinstance(spans, list)
            out["offset_mapping"] = [[int(start), int(end)] for start, end in spans]
        return out
    if body.op == "chat":
        messages = _need(body.messages, "messages", body.op)
        assert isinstance(messages, list)  # the body's type
        return {"text": tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=body.add_generation_prompt)}
    ids = list(_need(body.ids, "ids", body.op))  # type: ignore[call-overload]  # a list of ints, checked above
    size = len(tok) if isinstance(tok, Sized) else None
    bad = [i for i in ids if i < 0 or (size is not None and i >= size)]
    if bad:
        raise APIError(400, f"token id {bad[0]} is not in the vocabulary (0 to {size - 1 if size else '?'})",
                       param="ids")
    try:  # a tokenizer that does not know its size refuses a foreign id its own way
        if body.op == "tokens":
            found = tok.convert_ids_to_tokens(ids)
            tokens: list[JsonValue] = [str(t) for t in found] if isinstance(found, list) else [str(found)]
            return {"tokens": tokens}
        extra = {} if body.clean_up_tokenization_spaces is None else {
            "clean_up_tokenization_spaces": body.clean_up_tokenization_spaces}
        return {"text": tok.decode(ids, skip_special_tokens=body.skip_special_tokens, **extra)}
    except (OverflowError, ValueError, IndexError) as exc:
        raise APIError(400, f"token ids not in the vocabulary ({type(exc).__name__}: {str(exc)[:120]})",
                       param="ids") from None


def run_generate_text(body: GenerateTextBody, lm: LM, limits: ServeConfig) -> dict[str, JsonValue]:
    """Each prompt's completion(s), as LM.generate returns them (GenOutput as a dict), within the
    server's caps: settings as max_tokens and n are capped, each prompt as /v1/completions' are, and
    at most max_n prompts."""
    from llmlab.backends.base import GenRequest
    from llmlab.core import settings as settings_mod
    from llmlab.serving import openai_api as api

    settings = settings_mod.build(dict(body.settings))
    api.check_settings(settings, limits)
    if len(body.requests) > limits.max_n:
        raise APIError(400, f"{len(body.requests)} prompts are over this server's cap of {limits.max_n}",
                       param="requests")
    for r in body.requests:
        ids = lm.tokenizer(r.prompt, add_special_tokens=not r.templated)["input_ids"]
        api.check_prompt(list(ids), settings.max_new_tokens, lm.window, limits.prompt_cap(lm.window))
    outputs = lm.generate([GenRequest(r.prompt, r.templated) for r in body.requests], settings, batch_size=1)
    return {"object": "generation", "model": lm.name, "outputs": [_plain(dataclasses.asdict(o)) for o in outputs]}


def _plain(value: object) -> JsonValue:
    """A dataclass's asdict() as JSON values (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    assert value is None or isinstance(value, (str, int, float, bool))  # what GenOutput holds
    return value


def register(app: FastAPI, model: Callable[[Optional[str]], LM], limits: ServeConfig) -> None:
    @app.post("/v1/tokenizer")
    def tokenizer(body: TokenizerBody) -> dict:
        return run_tokenizer(body, model(body.model))

    @app.post("/v1/generate_text")
    def generate_text(body: GenerateTextBody) -> dict:
        return run_generate_text(body, model(body.model), limits)
