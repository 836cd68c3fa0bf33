"""Plain prompts (no template): one field of each input is the prompt; the context-window check
that a template's builder would otherwise do, with --overflow truncate keeping the prompt's end."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Sequence

from llmlab.core.errors import ContextOverflowError, DataError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM
    from llmlab.io.items import Item
    from llmlab.scoring.generation import Job

# A token is rarely longer than this many characters, so a prompt with more than window x this
# characters cannot fit: it is refused (or cut) before the tokenizer ever sees all of it.
MAX_CHARS_PER_TOKEN = 32


def fit(jobs: list[Job], lm: LM, max_new_tokens: int, overflow: str, warn: Callable[[str], None]) -> list[Job]:
    """The context-window check for prompts that no template built: a prompt over the window is
    refused (exit 5), or with --overflow truncate cut from the left to fit, with a warning (warn).
    A prompt of more than window x MAX_CHARS_PER_TOKEN characters is judged by its length alone,
    so a 10 MB line is never tokenized whole."""
    window = lm.window
    if not window:
        return jobs
    budget = window if lm.is_encoder_decoder else window - max_new_tokens
    if budget < 1:
        raise ContextOverflowError(f"--max-new-tokens {max_new_tokens} leaves no room in the {window}-token window")
    chars = budget * MAX_CHARS_PER_TOKEN
    out = []
    for job in jobs:
        # Records rendered by `prompt render` are final text: cutting them would cut the chat header.
        can_cut = overflow == "truncate" and job.item.fields.get("templated") is not True
        if len(job.model_text) > chars:
            if not can_cut:
                raise _too_long(job, f"{len(job.model_text):,} characters", window, max_new_tokens, lm)
            out.append(_cut(job, lm, budget, warn, f"{len(job.model_text):,} characters"))
            continue
        count = len(lm.token_ids(job.model_text, job.chat))
        if count <= budget:
            out.append(job)
        elif can_cut:
            out.append(_cut(job, lm, budget, warn, f"{count} tokens"))
        else:
            raise _too_long(job, f"{count} tokens", window, max_new_tokens, lm)
    return out


def _too_long(job: Job, size: str, window: int, max_new: int, lm: LM) -> ContextOverflowError:
    room = "" if lm.is_encoder_decoder else f" + {max_new} new tokens"
    return ContextOverflowError(
        f"{job.item.source}: the prompt has {size}{room}, over the model's {window}-token window; "
        "shorten it, lower --max-new-tokens, or use --overflow truncate to keep its end")


def _cut(job: Job, lm: LM, budget: int, warn: Callable[[str], None], before: str) -> Job:
    """Keep the end of the user's prompt, re-wrapped in the chat template when chatting, so the
    whole model text fits `budget` tokens."""
    from llmlab.scoring import generation

    tokenizer = lm.tokenizer
    ids = tokenizer(job.prompt[-budget * MAX_CHARS_PER_TOKEN:], add_special_tokens=False)["input_ids"]
    keep = min(len(ids), budget)
    while keep > 0:
        text = tokenizer.decode(ids[len(ids) - keep:])
        model_text = generation.chat_text(tokenizer, [{"role": "user", "content": text}]) if job.chat else text
        count = len(lm.token_ids(model_text, job.chat))
        if count <= budget:
            warn(f"{job.item.source}: prompt of {before} did not fit the {lm.window}-token window; "
                       f"kept its last {keep} tokens ({count} tokens now)")
            return generation.Job(job.item, text, model_text, job.chat)
        keep -= count - budget  # the wrapper and special tokens need this much more room
    raise ContextOverflowError(f"{job.item.source}: the chat template alone fills the {lm.window}-token window")


def jobs(items: Sequence[Item], field_name: str, lm: LM, chat: bool) -> list[Job]:
    """Jobs for prompts taken from one field; records from `prompt render -f jsonl` say
    `templated: true` and go to the model as they are (never wrapped a second time)."""
    from llmlab.scoring import generation

    out: list[Job] = []
    for item in items:
        text = item.fields[field_name]
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = json.dumps(text)  # io.require_text allowed it (finite) and warned: a number is its JSON text
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"no prompt: {item.source} has an empty or non-text '{field_name}' field")
        if item.fields.get("templated") is True:
            out.append(generation.Job(item, text, text, True))
        else:
            out += generation.plain_jobs([item], field_name, lm.tokenizer, chat)
    return out
