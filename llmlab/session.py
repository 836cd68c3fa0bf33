"""One run of a command: load the model once, decide chat once, build the prompt builder once;
then the library functions the commands call (generate, classify, render). They never print:
progress, warnings and logs go through the Hooks the CLI hands in.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

from llmlab import config as cfgmod
from llmlab.config import ClassifyConfig, GenerateConfig, ModelConfig, PromptConfig, RenderConfig
from llmlab.errors import ContextOverflowError, DataError, UsageError

# A token is rarely longer than this many characters, so a prompt with more than window x this
# characters cannot fit: it is refused (or cut) before the tokenizer ever sees all of it.
MAX_CHARS_PER_TOKEN = 32


class _Null:
    def advance(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def _no_progress(total: int | None, description: str) -> Iterator[Any]:
    yield _Null()


def _no_log(command: str, **details: Any) -> Any:
    from llmlab import runlog

    return runlog.NoRun()


@dataclass
class Hooks:
    """How library code talks to the person running it; the CLI fills these with console.* and
    with open_run, which records the run in the run log (runlog.open_run with the command line and
    --no-log filled in; called as open_run(command, config=..., templates=..., data=...))."""

    progress: Callable[[Optional[int], str], ContextManager[Any]] = _no_progress
    warn: Callable[[str], None] = lambda message: None
    info: Callable[[str], None] = lambda message: None
    note: Callable[[str], None] = lambda message: None
    open_run: Callable[..., Any] = _no_log


# ---------------------------------------------------------------- shared steps


def settings_for(template: Any = None, preset: Optional[Path] = None, flags: dict[str, Any] | None = None):
    """Generation settings: the template's defaults, then a --config preset, then flags."""
    from llmlab import settings

    layers = []
    if template is not None and template.generation:
        layers.append(settings.normalize_keys(template.generation, f"template '{template.name}'"))
    if preset:
        layers.append(settings.load_preset(preset))
    return settings.build(*layers, flags or {})


def chat_for(tokenizer: Any, chat: Optional[str], template: Any = None) -> bool:
    """--chat, else the template's chat, else auto."""
    from llmlab import generation

    return generation.use_chat(tokenizer, chat or (template.chat if template is not None else None) or "auto")


def read_input(path: str, fmt: str, field_name: str, offset: int = 0, limit: Optional[int] = None) -> list[Any]:
    from llmlab import io

    items = io.read_items(path, fmt, text_field=field_name)
    items = cfgmod.window(items, offset, limit, "stdin" if path == "-" else path)
    io.check_unique_ids(items)
    return items


def single_prompt(text: Optional[str]) -> Optional[str]:
    """The prompt from the argument, else from piped stdin; None when there is none or it is blank."""
    if text is None and sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read().rstrip("\n")
    return text if text is not None and text.strip() else None


NO_PROMPT = 'no prompt: run llmlab {cmd} "your prompt", pipe one on stdin, or use --input FILE'


def template_item(template: Any, text: Optional[str], pairs: Sequence[str], cmd: str) -> Any:
    """A single item for a template: from --var field=value, or the argument for a one-field template."""
    from llmlab import io, prompts

    values = prompts.parse_vars(pairs)
    if text is not None:
        fields = [f for f in template.fields if f not in values]
        if len(fields) != 1:
            raise UsageError(
                f"template '{template.name}' has fields {', '.join(template.fields)}: give them with --var field=value"
            )
        values[fields[0]] = text
    if not values:
        raise UsageError(NO_PROMPT.format(cmd=cmd) + f" (or --var {template.fields[0]}=...)")
    return io.Item(0, values, "--var")


class Session:
    """A loaded model plus the decisions every command makes the same way."""

    def __init__(self, model: ModelConfig, lm: Any = None, hooks: Optional[Hooks] = None):
        from llmlab import models

        self.model = model
        if lm is None and model.backend == "vllm":
            from llmlab.backends import vllm

            lm = vllm.load(model.spec, model.dtype, model.tensor_parallel_size)
        self.lm = lm if lm is not None else models.load(model.spec, model.device, model.dtype,
                                                        device_map=model.device_map, max_memory=model.max_memory)
        if hooks is not None:  # the backend's messages (out-of-memory back-off, unreachable stop texts)
            self.lm.on_event = lambda level, message: (hooks.warn if level >= 30 else hooks.info)(message)

    def chat(self, template: Any = None) -> bool:
        return chat_for(self.lm.tokenizer, self.model.chat, template)

    def builder(self, template: Any, prompt: PromptConfig, max_new_tokens: int, input_path: Optional[str],
                default_selection: str = "first"):
        from llmlab import prompts

        lm = self.lm
        options = prompts.options_for(template, prompt.shots, prompt.selection, prompt.seed, self.chat(template),
                                      prompt.shot_format, prompt.overflow, max_new_tokens,
                                      default_selection=default_selection)
        return prompts.make_builder(template, lm.tokenizer, lm.window, options, prompt.examples, input_path,
                                    lm.is_encoder_decoder, lm=lm)


def check_prompt_options(prompt: PromptConfig) -> None:
    """Option values a prompt builder would reject, rejected before the model loads."""
    if prompt.shots is not None and prompt.shots < 0:
        raise UsageError(f"invalid --shots {prompt.shots}: must be >= 0")
    cfgmod.check_prompts_dirs(prompt.prompts_dir)


def find_template(prompt: PromptConfig) -> Any:
    from llmlab import prompts

    check_prompt_options(prompt)
    return prompts.find_template(prompt.template, prompt.prompts_dir) if prompt.template else None


# ---------------------------------------------------------------- plain prompts and the window


def fit_plain(jobs: list[Any], lm: Any, max_new_tokens: int, overflow: str, hooks: Hooks) -> list[Any]:
    """The context-window check for prompts that no template built: a prompt over the window is
    refused (exit 5), or with --overflow truncate cut from the left to fit, with a warning.
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
            out.append(_cut(job, lm, budget, hooks, f"{len(job.model_text):,} characters"))
            continue
        count = len(lm.token_ids(job.model_text, job.chat))
        if count <= budget:
            out.append(job)
        elif can_cut:
            out.append(_cut(job, lm, budget, hooks, f"{count} tokens"))
        else:
            raise _too_long(job, f"{count} tokens", window, max_new_tokens, lm)
    return out


def _too_long(job: Any, size: str, window: int, max_new: int, lm: Any) -> ContextOverflowError:
    room = "" if lm.is_encoder_decoder else f" + {max_new} new tokens"
    return ContextOverflowError(
        f"{job.item.source}: the prompt has {size}{room}, over the model's {window}-token window; "
        "shorten it, lower --max-new-tokens, or use --overflow truncate to keep its end")


def _cut(job: Any, lm: Any, budget: int, hooks: Hooks, before: str) -> Any:
    """Keep the end of the user's prompt, re-wrapped in the chat template when chatting, so the
    whole model text fits `budget` tokens."""
    from llmlab import generation

    tokenizer = lm.tokenizer
    ids = tokenizer(job.prompt[-budget * MAX_CHARS_PER_TOKEN:], add_special_tokens=False)["input_ids"]
    keep = min(len(ids), budget)
    while keep > 0:
        text = tokenizer.decode(ids[len(ids) - keep:])
        model_text = generation.chat_text(tokenizer, [{"role": "user", "content": text}]) if job.chat else text
        count = len(lm.token_ids(model_text, job.chat))
        if count <= budget:
            hooks.warn(f"{job.item.source}: prompt of {before} did not fit the {lm.window}-token window; "
                       f"kept its last {keep} tokens ({count} tokens now)")
            return generation.Job(job.item, text, model_text, job.chat)
        keep -= count - budget  # the wrapper and special tokens need this much more room
    raise ContextOverflowError(f"{job.item.source}: the chat template alone fills the {lm.window}-token window")


def plain_jobs(items: Sequence[Any], field_name: str, lm: Any, chat: bool) -> list[Any]:
    """Jobs for prompts taken from one field; records from `prompt render -f jsonl` say
    `templated: true` and go to the model as they are (never wrapped a second time)."""
    from llmlab import generation

    jobs = []
    for item in items:
        text = item.fields[field_name]
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = json.dumps(text)  # io.require_text allowed it (finite) and warned: a number is its JSON text
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"no prompt: {item.source} has an empty or non-text '{field_name}' field")
        if item.fields.get("templated") is True:
            jobs.append(generation.Job(item, text, text, True))
        else:
            jobs += generation.plain_jobs([item], field_name, lm.tokenizer, chat)
    return jobs


# ---------------------------------------------------------------- generate


def _generate_items(cfg: GenerateConfig, template: Any) -> list[Any]:
    from llmlab import io, prompts

    if cfg.input.path is not None:
        if cfg.text is not None or cfg.prompt.vars:
            raise UsageError("give either a PROMPT argument (or --var) or --input FILE, not both")
        items = read_input(cfg.input.path, cfg.input.format, cfg.input.field, cfg.input.offset, cfg.input.limit)
        if template is None:
            io.require_field(items, cfg.input.field)
        else:
            prompts.require_fields(items, template)
        return items
    text = single_prompt(cfg.text)
    if template is not None:
        return [template_item(template, text, cfg.prompt.vars, "generate")]
    if text is None:
        raise UsageError(NO_PROMPT.format(cmd="generate"))
    return [io.Item(0, {cfg.input.field: text}, "the prompt")]


def generate(cfg: GenerateConfig, hooks: Hooks = Hooks(), lm: Any = None) -> None:
    """`llmlab generate`: one prompt streamed to stdout, or a batch written record by record."""
    from llmlab import generation, io

    from llmlab.backends import hf_continuous

    template = find_template(cfg.prompt)
    settings = settings_for(template, cfg.preset, cfg.flags)
    hf_continuous.check(cfg.gen_engine, settings, cfg.model.backend)
    io.check_output_path(cfg.output.path, inputs=[cfg.input.path])
    items = _generate_items(cfg, template)
    single = cfg.input.path is None and cfg.output.terminal
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume)
    todo = sink.pending(items)
    if cfg.output.resume and len(todo) < len(items):
        hooks.info(f"--resume: {len(items) - len(todo)} of {len(items)} inputs already done")
    if not todo:
        return
    # Opened before the model loads: a log that can't be written fails before any model time.
    with hooks.open_run("generate", config=_logged_config(cfg, settings), templates=template,
                        data=cfg.input.path) as log:
        session = _loaded(cfg.model, lm, log, hooks)
        session.lm.gen_engine = cfg.gen_engine
        if template is None:
            jobs = plain_jobs(todo, cfg.input.field, session.lm, session.chat())
            jobs = fit_plain(jobs, session.lm, settings.max_new_tokens, cfg.prompt.overflow, hooks)
        else:
            builder = session.builder(template, cfg.prompt, settings.max_new_tokens, cfg.input.path)
            jobs = generation.template_jobs(builder, todo)

        def logged(job: Any, rec: dict[str, Any]) -> None:
            log.item(job.item.index, job.model_text, rec["completion"], key=job.item.key,
                     extra={"input": job.item.fields, **({"completions": rec["completions"]}
                                                         if "completions" in rec else {})})

        if single:
            output = generation.run_single(session.lm, jobs[0], settings, cfg.echo)
            logged(jobs[0], generation.record(jobs[0], output, session.lm.name, cfg.echo))
        else:
            with sink as writer, hooks.progress(len(jobs), "generating") as bar:

                def done(job: Any, output: Any) -> None:
                    rec = generation.record(job, output, session.lm.name, cfg.echo)
                    writer.write(rec)
                    logged(job, rec)
                    bar.advance(1)

                run_jobs(session.lm, jobs, settings, cfg.batch_size, done)
        log.metrics({"items": len(jobs)})


def _loaded(model: ModelConfig, lm: Any, log: Any, hooks: Optional[Hooks] = None) -> "Session":
    """The session (its model loaded), with the model's name and device filled into the run log."""
    session = Session(model, lm, hooks)
    log.update(model=session.lm.name, device=str(session.lm.device))
    return session


def _logged_config(cfg: Any, settings: Any = None) -> dict[str, Any]:
    """What a run was asked to do, for the run log: the typed config, plus the generation settings
    in force (template defaults, preset and flags merged)."""
    import dataclasses

    logged = dataclasses.asdict(cfg)
    logged.pop("text", None)  # the prompt itself is logged as the item
    if settings is not None:
        logged["settings"] = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else vars(settings)
    return logged


def requests(jobs: Sequence[Any]) -> list[Any]:
    """The backend's requests: the model text, and whether it is already templated (no special
    tokens added)."""
    from llmlab.models import GenRequest

    return [GenRequest(j.model_text, j.chat) for j in jobs]


def run_jobs(lm: Any, jobs: Sequence[Any], settings: Any, batch_size: Optional[int],
             done: Callable[[Any, Any], Any]) -> list[Any]:
    """Generate for every job; done(job, output) is called in input order as results arrive."""
    return lm.generate(requests(jobs), settings, batch_size=batch_size,
                       on_output=lambda index, output: done(jobs[index], output))


# ---------------------------------------------------------------- classify


def classify(cfg: ClassifyConfig, hooks: Hooks = Hooks(), table: bool = False, lm: Any = None):
    """`llmlab classify`: returns (results, classifier) when `table` (a person reads them), else
    writes one record per input as it is done and returns None."""
    from llmlab import classify as clf, io, prompts

    template = find_template(cfg.prompt)
    if template is None or template.task != "classify":
        name = template.name if template else cfg.prompt.template
        raise UsageError(f"template '{name}' is a generate template; classify needs task: classify with labels")
    _check_classify_options(cfg)
    settings = settings_for(template)
    io.check_output_path(cfg.output.path, inputs=[cfg.input.path])
    if cfg.input.path is not None:
        if cfg.text is not None or cfg.prompt.vars:
            raise UsageError("give either a TEXT argument (or --var) or --input FILE, not both")
        items = read_input(cfg.input.path, cfg.input.format, template.fields[0], cfg.input.offset, cfg.input.limit)
    else:
        items = [template_item(template, single_prompt(cfg.text), cfg.prompt.vars, "classify")]
    prompts.require_fields(items, template)
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume, text_key="prediction")
    todo = sink.pending(items)
    if not todo:
        return None
    # An explicit --calibration wins; else the template's calibrate: (which only applies to scoring).
    mode = clf.calibration_mode(cfg.calibrate) if cfg.calibrate is not None else \
        (template.calibrate or "off") if cfg.method == "score" else "off"
    if mode == "batch" and len(todo) < 2:
        raise UsageError("--calibration batch estimates the bias from the inputs themselves: give several "
                         "(--input FILE), or use contextual or domain for one input")
    with hooks.open_run("classify", config=_logged_config(cfg), templates=template, data=cfg.input.path) as log:
        session = _loaded(cfg.model, lm, log, hooks)
        builder = session.builder(template, cfg.prompt, settings.max_new_tokens, cfg.input.path)
        classifier = clf.Classifier(session.lm, builder, cfg.method, cfg.normalize, mode, cfg.batch_size,
                                    settings, cfg.ensemble)
        # Results are handed on per chunk: small chunks keep the progress bar true to the work done.
        chunk = 2 * (cfg.batch_size or 16)
        with contextlib.ExitStack() as stack:
            writer = None if table else stack.enter_context(sink)
            bar = stack.enter_context(hooks.progress(len(todo), "classifying"))

            def done(r: Any) -> None:
                if writer is not None:
                    writer.write(clf.record(r, template, session.lm.name))
                log.item(r.item.index, r.prompt, r.completion, r.prediction, r.probabilities,
                         r.item.fields.get(template.target), {"input": r.item.fields}, key=r.item.key)
                bar.advance(1)

            results = classifier.classify(todo, on_result=done, chunk=chunk)
        log.metrics(classify_metrics(results, template))
    return (results, classifier) if table else None


def classify_metrics(results: Sequence[Any], template: Any) -> dict[str, Any]:
    """The run log's metrics of a classify run: items, and accuracy over the labeled ones."""
    golds = [(r.prediction, str(r.item.fields[template.target])) for r in results
             if template.target and r.item.fields.get(template.target) is not None]
    metrics: dict[str, Any] = {"items": len(results)}
    if golds:
        metrics.update(accuracy=sum(p == g for p, g in golds) / len(golds), labeled=len(golds))
    return metrics


def evaluate(plan: Any, model: ModelConfig, hooks: Hooks = Hooks(), lm: Any = None) -> dict[str, Any]:
    """`llmlab eval` on a checked plan: one logged run, each item logged as it is scored and each
    combination's metrics as it finishes. Returns the report (evaluate.evaluate's)."""
    from llmlab import evaluate as ev

    data = ", ".join(dict.fromkeys(t.data for t in plan.tasks))
    with hooks.open_run("eval", config=ev.plan_config(plan, model.chat), templates=[t.template for t in plan.tasks],
                        data=data) as log:
        session = _loaded(model, lm, log, hooks)
        with hooks.progress(plan.total(), "evaluating") as bar:
            return ev.evaluate(session, plan, bar, log)


def _check_classify_options(cfg: ClassifyConfig) -> None:
    if cfg.calibrate not in (None, "off") and cfg.method != "score":
        raise UsageError("--calibrate needs --method score: it adjusts label probabilities")


# ---------------------------------------------------------------- prompt render


@dataclass
class Rendered:
    item: Any
    prompt: Any  # prompts.Prompt
    seen: str  # the prompt as the model sees it: decoded from its ids (T5 normalises newlines to spaces)


@dataclass
class RenderRun:
    window: Optional[int]
    budget: Optional[int]
    prompts: Iterator[Rendered] = field(default_factory=lambda: iter(()))


def render(cfg: RenderConfig, hooks: Hooks = Hooks()) -> RenderRun:
    """`llmlab prompt render`: the exact prompts, built with the tokenizer only (no weights)."""
    from llmlab import models, prompts

    template = find_template(cfg.prompt)
    if cfg.input.path is not None:
        items = read_input(cfg.input.path, cfg.input.format, template.fields[0], cfg.input.offset, cfg.input.limit)
        prompts.require_fields(items, template)
    else:
        items = [template_item(template, None, cfg.prompt.vars, "prompt render")]
    tokenizer, window, encoder_decoder = models.load_tokenizer(cfg.model.spec)
    settings = settings_for(template, None, {"max_new_tokens": cfg.max_new_tokens})
    options = prompts.options_for(template, cfg.prompt.shots, cfg.prompt.selection, cfg.prompt.seed,
                                  chat_for(tokenizer, cfg.model.chat, template), cfg.prompt.shot_format,
                                  cfg.prompt.overflow, settings.max_new_tokens)
    builder = prompts.make_builder(template, tokenizer, window, options, cfg.prompt.examples, cfg.input.path,
                                   encoder_decoder)

    def each() -> Iterator[Rendered]:
        for item in items:
            built = builder.build(item)
            for note in built.notes:
                hooks.warn(note)
            # What the model sees after the tokenizer's normalisation (T5: newlines become spaces).
            yield Rendered(item, built, prompts.model_view(tokenizer, built.text))

    return RenderRun(window, builder.budget(), each())


def render_record(r: Rendered) -> dict[str, Any]:
    """A `prompt render -f jsonl` record; `templated` says the prompt went through the chat template,
    so `generate --input` sends it as it is."""
    extra = {"model_text": r.seen} if r.seen != r.prompt.text else {}
    return {"index": r.item.index, **r.item.fields, "prompt": r.prompt.text, **extra, "templated": r.prompt.chat,
            "tokens": r.prompt.tokens, "shots": len(r.prompt.shots)}


def with_prompt(prompt: PromptConfig, **changes: Any) -> PromptConfig:
    return replace(prompt, **changes)
