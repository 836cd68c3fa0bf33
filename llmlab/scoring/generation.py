"""`llmlab generate`: turn input items into prompts, run them in batches, write records as they finish."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from llmlab.core.errors import UsageError
from llmlab.io.records import Item

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM, GenOutput, Tokenizer
    from llmlab.core.settings import GenerationSettings
    from llmlab.prompting.prompts import PromptBuilder

CHAT_MODES = ("auto", "on", "off")


def use_chat(tokenizer: Tokenizer, mode: str) -> bool:
    """--chat auto: wrap prompts in the chat template when the tokenizer has one."""
    if mode not in CHAT_MODES:
        raise UsageError(f"invalid --chat '{mode}': choose auto, on or off")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise UsageError("--chat on: this model's tokenizer has no chat template; use --chat off or auto")
    return has_template and mode != "off"


def chat_text(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The exact text the chat template makes of `messages`, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Job:
    """One input item and the prompt built for it: `prompt` is the readable text, `model_text`
    what the model sees (the same, or wrapped by the chat template)."""

    item: Item
    prompt: str
    model_text: str
    chat: bool


def plain_jobs(items: Sequence[Item], field: str, tokenizer: Tokenizer, chat: bool) -> list[Job]:
    """Jobs whose prompt is one field of each item, wrapped as a user turn when chatting."""
    jobs = []
    for item in items:
        prompt = str(item.fields[field])
        text = chat_text(tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt
        jobs.append(Job(item, prompt, text, chat))
    return jobs


def template_jobs(builder: PromptBuilder, items: Sequence[Item]) -> list[Job]:
    """Jobs whose prompts the template builder makes; its notes (dropped shots...) go to the
    builder's on_warn."""
    jobs = []
    for item in items:
        prompt = builder.build(item)
        for note in prompt.notes:
            builder.on_warn(note)
        jobs.append(Job(item, prompt.plain, prompt.text, prompt.chat))
    return jobs


def record(job: Job, output: GenOutput, model_name: str, echo: bool) -> dict[str, object]:
    completions = [job.prompt + c if echo else c for c in output.completions]
    rec: dict[str, object] = {"index": job.item.index, **job.item.fields, "prompt": job.prompt}
    rec["completion"] = completions[0]
    if len(completions) > 1:
        rec["completions"] = completions
    rec["prompt_tokens"] = output.prompt_tokens
    rec["completion_tokens"] = output.completion_tokens[0] if len(completions) == 1 else output.completion_tokens
    rec["finish_reason"] = output.finish_reasons[0] if len(completions) == 1 else output.finish_reasons
    if output.logprobs is not None:
        tokens = [[t.as_record() for t in seq] for seq in output.logprobs]
        rec["logprobs"] = tokens[0] if len(completions) == 1 else tokens
    rec["model"] = model_name
    return rec


def run_single(lm: LM, job: Job, settings: GenerationSettings, echo: bool, emit: Callable[[str], None],
               engine: str = "auto") -> GenOutput:
    """One prompt: stream the completion through emit(text) (stdout for a person) as it is
    generated; several completions (beams, -n) are emitted whole, one per line. engine: --gen-engine."""
    from llmlab.backends.models import GenRequest

    request = GenRequest(job.model_text, job.chat)
    if settings.num_return_sequences == 1 and settings.num_beams == 1:
        if echo:
            emit(job.prompt)
        output = lm.generate([request], settings, batch_size=1, stream=emit, engine=engine)[0]
        emit("\n")
        return output
    output = lm.generate([request], settings, batch_size=1, engine=engine)[0]
    for completion in output.completions:
        emit((job.prompt if echo else "") + completion + "\n")
    return output
