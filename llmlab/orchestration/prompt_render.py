"""`llmlab prompt render`: the exact prompts a template builds, with the tokenizer only (no
weights), and what the model sees of them after its tokenizer's normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from llmlab.core.config import RenderConfig
from llmlab.orchestration.session import Hooks, chat_for, read_input, required_template, settings_for, template_item

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import Tokenizer
    from llmlab.io.items import Item
    from llmlab.prompting.prompts import Prompt
    from llmlab.prompting.templates import Template


@dataclass
class Rendered:
    item: Item
    prompt: Prompt
    seen: str  # the prompt as the model sees it: decoded from its ids (T5 normalises newlines to spaces)


@dataclass
class RenderRun:
    window: Optional[int]
    budget: Optional[int]
    prompts: Iterator[Rendered] = field(default_factory=lambda: iter(()))


def render(cfg: RenderConfig, hooks: Hooks = Hooks(), items: Optional[list[Item]] = None,
           loaded: tuple[Tokenizer, Optional[int], bool] | None = None) -> RenderRun:
    """`llmlab prompt render`: the exact prompts, built with the tokenizer only (no weights).
    items: the inputs, given (the server); loaded: (tokenizer, window, encoder_decoder) already loaded."""
    from llmlab.backends import models
    from llmlab.prompting import prompts

    template = required_template(cfg.prompt)
    if items is None and cfg.input.path is not None:
        items = read_input(cfg.input.path, cfg.input.format, template.fields[0], cfg.input.offset, cfg.input.limit)
    if items is None:
        items = [template_item(template, None, cfg.prompt.vars, "prompt render")]
    else:
        prompts.require_fields(items, template)
    tokenizer, window, encoder_decoder = loaded or models.load_tokenizer(cfg.model.spec)
    settings = settings_for(template, None, {"max_new_tokens": cfg.max_new_tokens})
    options = prompts.options_for(template, cfg.prompt.shots, cfg.prompt.selection, cfg.prompt.seed,
                                  chat_for(tokenizer, cfg.model.chat, template), cfg.prompt.shot_format,
                                  cfg.prompt.overflow, settings.max_new_tokens)
    builder = prompts.make_builder(template, tokenizer, window, options, cfg.prompt.examples, cfg.input.path,
                                   encoder_decoder, on_warn=hooks.warn)

    def each() -> Iterator[Rendered]:
        for item in items:
            built = builder.build(item)
            for note in built.notes:
                hooks.warn(note)
            # What the model sees after the tokenizer's normalisation (T5: newlines become spaces).
            yield Rendered(item, built, prompts.model_view(tokenizer, built.text))

    return RenderRun(window, builder.budget(), each())


def render_record(r: Rendered) -> dict[str, object]:
    """A `prompt render -f jsonl` record; `templated` says the prompt went through the chat template,
    so `generate --input` sends it as it is."""
    extra = {"model_text": r.seen} if r.seen != r.prompt.text else {}
    return {"index": r.item.index, **r.item.fields, "prompt": r.prompt.text, **extra, "templated": r.prompt.chat,
            "tokens": r.prompt.tokens, "shots": len(r.prompt.shots)}


def template_info(template: Template) -> list[tuple[str, str]]:
    """`llmlab prompt show`: what a template is made of, as (key, value) rows."""
    from llmlab.core.settings import build, normalize_keys

    settings = build(normalize_keys(template.generation, template.name) if template.generation else {})
    pool = str(template.examples_path) if template.examples_path else "inline in the template"
    labels = ", ".join(f"{k} ({v})" if v != k else k for k, v in template.labels.items())
    shots = template.shots or 0
    defaults = f"shots {shots}" + (f", calibrate {template.calibrate or 'off'}" if template.task == "classify" else "")
    defaults += (f", chat {template.chat or 'auto'}, shot format {template.shot_format or 'turns'}, shot selection "
                f"{'balanced' if template.task == 'classify' else 'first'}, max_new_tokens {settings.max_new_tokens}")
    if settings.stop:
        defaults += f", stop {settings.stop!r}"
    rows = [("name", template.name), ("file", str(template.path)), ("task", template.task),
            ("description", template.description), ("fields", ", ".join(template.fields)),
            ("target", template.target or "-")]
    if template.task == "classify":
        rows.append(("labels", labels))
    if template.references:
        rows.append(("references", ", ".join(template.references)))
    rows += [("examples", f"{len(template.examples)} ({pool})"), ("defaults", defaults)]
    return rows
