"""/v1/completions and /v1/chat/completions on an LM: requests in, OpenAI response bodies out.
Streaming (server-sent events) is in app.py; the checks and body shapes are in openai_api.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from llmlab.backends.base import GenRequest, TokenLogprob
from llmlab.serving import openai_api as api
from llmlab.serving.errors import APIError

if TYPE_CHECKING:
    from llmlab.backends.base import LM, PromptScores
    from llmlab.core.config import ServeConfig
    from llmlab.core.settings import GenerationSettings

# One completion: its text, its tokens (with logprobs) or None, its token count, why it ended.
_Sequence = tuple[str, Optional[list[TokenLogprob]], int, str]


def _greedy_next(lm: LM, scores: PromptScores, top: int) -> tuple[str, list[TokenLogprob], str]:
    """One greedy token read off the prompt's own scoring pass (echo + logprobs + max_tokens 1, as
    lm-eval asks): no second forward pass, and always exactly one token after the prompt."""
    text, token_id, lp = scores.next[0]
    token = TokenLogprob(text, token_id, lp, list(scores.next[:top]))
    if token_id == getattr(lm.tokenizer, "eos_token_id", None):
        return "", [token], "stop"
    return text, [token], "length"


def _generated(lm: LM, body: api.CompletionBody, prompts: list[tuple[str, list[int], bool]], st: GenerationSettings,
               scored: Optional[list[PromptScores]], max_tokens: int) -> list[list[_Sequence]]:
    """Per prompt, body.n (text, tokens or None, token count, finish reason)."""
    if max_tokens == 0:
        none: _Sequence = ("", [], 0, "length")
        return [[none] * body.n for _ in prompts]
    if scored is not None and max_tokens == 1 and not st.do_sample:
        picks = [_greedy_next(lm, s, max(1, body.logprobs or 1)) for s in scored]
        return [[(text, tokens, 1, finish)] * body.n for text, tokens, finish in picks]
    outputs = lm.generate([GenRequest(text, as_ids) for text, _, as_ids in prompts], st, batch_size=len(prompts))
    runs: list[list[_Sequence]] = []
    for out in outputs:
        seqs = [(c, out.logprobs[k] if out.logprobs else None, out.completion_tokens[k], out.finish_reasons[k])
                for k, c in enumerate(out.completions)]
        runs.append(seqs * (body.n // len(seqs)) if len(seqs) < body.n else seqs)
    return runs


def completions(body: api.CompletionBody, lm: LM, limits: ServeConfig, name: str) -> api.Envelope:
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    api.check_caps(body, max_tokens, limits)
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: add echo (with logprobs) to score the prompt",
                       param="max_tokens")
    prompts = api.prompts_of(body, lm)
    for _, ids, _ in prompts:
        api.check_prompt(ids, max_tokens, lm.window, limits.prompt_cap(lm.window))
    st = api.settings(body, max_tokens, body.logprobs)
    scored = None
    if body.echo and body.logprobs is not None:
        scored = lm.prompt_logprobs([ids for _, ids, _ in prompts], top=max(1, body.logprobs))
    runs = _generated(lm, body, prompts, st, scored, max_tokens)
    choices: list[api.CompletionChoice] = []
    used = 0
    for i, ((text, ids, _), seqs) in enumerate(zip(prompts, runs)):
        for j, (completion, tokens, count, finish) in enumerate(seqs):
            used += count
            logprobs = None
            if body.logprobs is not None:
                first = lm.tokenizer.decode(ids[:1])
                logprobs = api.completion_logprobs(scored[i] if scored else None, first, tokens or [])
            choices.append({"index": i * body.n + j, "text": (text if body.echo else "") + completion,
                            "logprobs": logprobs, "finish_reason": finish})
    return api.envelope("text_completion", name, choices, api.usage(sum(len(p[1]) for p in prompts), used))


def chat_request(body: api.ChatBody, lm: LM, limits: ServeConfig) -> tuple[GenRequest, GenerationSettings, int]:
    """The templated prompt, its settings and its token count; max_tokens defaults to what fits."""
    if not lm.has_chat_template:
        raise APIError(400, f"{lm.name} has no chat template: use /v1/completions", param="messages")
    messages = [m.model_dump() for m in body.messages]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = lm.token_ids(text, templated=True)
    room = (lm.window or 10**9) - len(ids)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(limits.max_tokens, room))
    api.check_caps(body, max_tokens, limits)
    api.check_prompt(ids, max_tokens, lm.window, limits.prompt_cap(lm.window))
    top = (body.top_logprobs or 0) if body.logprobs else None
    return GenRequest(text, True), api.settings(body, max_tokens, top), len(ids)


def chat(body: api.ChatBody, lm: LM, limits: ServeConfig, name: str) -> api.Envelope:
    request, st, prompt_tokens = chat_request(body, lm, limits)
    out = lm.generate([request], st, batch_size=1)[0]
    seqs = list(range(len(out.completions))) * (body.n // len(out.completions) if len(out.completions) < body.n else 1)
    choices: list[api.ChatChoice] = [{"index": j, "message": {"role": "assistant", "content": out.completions[k]},
                "logprobs": api.chat_logprobs(out.logprobs[k]) if out.logprobs else None,
                "finish_reason": out.finish_reasons[k]} for j, k in enumerate(seqs)]
    used = sum(out.completion_tokens[k] for k in seqs)
    return api.envelope("chat.completion", name, choices, api.usage(prompt_tokens, used))
