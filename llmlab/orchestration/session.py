"""One run of a command: load the model once, decide chat once, build the prompt builder once;
then the library functions the commands call (generate, classify, evaluate; prompt render is in
prompt_render.py, plain prompts' window check in plain.py). They never print: progress, warnings,
logs and streamed text go through the Hooks the CLI hands in.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Mapping, Optional, Sequence, Union

from llmlab.core import config as cfgmod
from llmlab.core.config import ClassifyConfig, GenerateConfig, ModelConfig, PromptConfig
from llmlab.core.errors import UsageError
from llmlab.core.jsontypes import JSONValue
from llmlab.orchestration import adapted
from llmlab.orchestration import resolve
from llmlab.orchestration.resolve import probe_source  # noqa: F401 - callers import it from here too

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from _typeshed import DataclassInstance

    from llmlab.backends.base import LM, GenOutput, GenRequest, Tokenizer
    from llmlab.core.console import Bar
    from llmlab.core.settings import GenerationSettings
    from llmlab.io.items import Item
    from llmlab.prompting.prompts import PromptBuilder
    from llmlab.runs.runlog import NoRun, Run
    from llmlab.scoring.classify import Classification, Classifier
    from llmlab.scoring.generation import Job
    from llmlab.prompting.templates import Template

# Where a run's items and metrics go: the run log, or NoRun with logging off.
RunLog = Union["Run", "NoRun"]


class _Null:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


@contextlib.contextmanager
def _no_progress(total: int | None, description: str) -> Iterator[Bar]:
    yield _Null()


def _no_log(command: str, **details: object) -> NoRun:
    from llmlab.runs import runlog

    return runlog.NoRun()


@dataclass
class Hooks:
    """How library code talks to the person running it; the CLI fills these with console.* and
    with open_run, which records the run in the run log (runlog.open_run with the command line and
    --no-log filled in; called as open_run(command, config=..., templates=..., data=...))."""

    progress: Callable[[Optional[int], str], ContextManager[Bar]] = _no_progress
    warn: Callable[[str], None] = lambda message: None
    info: Callable[[str], None] = lambda message: None
    note: Callable[[str], None] = lambda message: None
    detail: Callable[[str], None] | None = None  # facts shown only with --verbose (None: not asked for)
    open_run: Callable[..., ContextManager[RunLog]] = _no_log
    emit: Callable[[str], None] = lambda text: None  # stdout text streamed to a person (a completion)


# ---------------------------------------------------------------- shared steps


def settings_for(template: Optional[Template] = None, preset: Optional[Path] = None,
                 flags: Mapping[str, object] | None = None) -> GenerationSettings:
    """Generation settings: the template's defaults, then a --config preset, then flags."""
    from llmlab.core import settings

    layers = []
    if template is not None and template.generation:
        layers.append(settings.normalize_keys(template.generation, f"template '{template.name}'"))
    if preset:
        layers.append(settings.load_preset(preset))
    return settings.build(*layers, flags or {})


def chat_for(tokenizer: Tokenizer, chat: Optional[str], template: Optional[Template] = None) -> bool:
    """--chat, else the template's chat, else auto."""
    from llmlab.scoring import generation

    return generation.use_chat(tokenizer, chat or (template.chat if template is not None else None) or "auto")


def read_input(path: str, fmt: str, field_name: str, offset: int = 0, limit: Optional[int] = None,
               sample: Optional[int] = None, sample_seed: int = 0) -> list[Item]:
    from llmlab.io import records as io

    items = io.read_items(path, fmt, text_field=field_name)
    source = "stdin" if path == "-" else path
    items = cfgmod.window(cfgmod.sample(items, sample, sample_seed, source), offset, limit, source)
    io.check_unique_ids(items)
    return items


def single_prompt(text: Optional[str]) -> Optional[str]:
    """The prompt from the argument, else from piped stdin; None when there is none or it is blank."""
    if text is None and sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read().rstrip("\n")
    return text if text is not None and text.strip() else None


NO_PROMPT = 'no prompt: run llmlab {cmd} "your prompt", pipe one on stdin, or use --input FILE'


def template_item(template: Template, text: Optional[str], pairs: Sequence[str], cmd: str) -> Item:
    """A single item for a template: from --var field=value, or the argument for a one-field template."""
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    values: dict[str, JSONValue] = dict(prompts.parse_vars(pairs))
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

    def __init__(self, model: ModelConfig, lm: Optional[LM] = None, hooks: Optional[Hooks] = None):
        from llmlab.backends import registry

        from llmlab.scoring.scorecache import ScoreCache

        self.model = model
        self.hooks = hooks or Hooks()
        self.scores = ScoreCache()  # label scores of this model, shared by the run's classifiers

        def on_event(level: int, message: str) -> None:  # the backend's own messages, as warnings or info
            (self.hooks.warn if level >= 30 else self.hooks.info)(message)

        events = on_event if hooks is not None else None
        self.lm = lm if lm is not None else registry.open_backend(model, events)
        if lm is not None and events is not None:  # a model handed in (tests, library use): same messages
            lm.on_event = events

    def chat(self, template: Optional[Template] = None) -> bool:
        return chat_for(self.lm.tokenizer, self.model.chat, template)

    def builder(self, template: Template, prompt: PromptConfig, max_new_tokens: int, input_path: Optional[str],
                default_selection: str = "first") -> PromptBuilder:
        from llmlab.prompting import prompts

        lm = self.lm
        shots = resolve.shots(prompt.shots, template).value
        options = prompts.options_for(template, shots, prompt.selection, prompt.seed, self.chat(template),
                                      prompt.shot_format, prompt.overflow, max_new_tokens,
                                      default_selection=default_selection)
        return prompts.make_builder(template, lm.tokenizer, lm.window, options, prompt.examples, input_path,
                                    lm.is_encoder_decoder, lm=lm, on_warn=self.hooks.warn)


def check_prompt_options(prompt: PromptConfig) -> None:
    """Option values a prompt builder would reject, rejected before the model loads."""
    resolve.shots(prompt.shots, None)
    cfgmod.check_prompts_dirs(prompt.prompts_dir)


def find_template(prompt: PromptConfig) -> Optional[Template]:
    from llmlab.prompting import prompts

    check_prompt_options(prompt)
    template = prompts.find_template(prompt.template, prompt.prompts_dir) if prompt.template else None
    return _usable(template, prompt) if template is not None else None


def required_template(prompt: PromptConfig) -> Template:
    """find_template for the commands that need one: an empty name is an unknown template, not none."""
    from llmlab.prompting import prompts

    check_prompt_options(prompt)
    return _usable(prompts.find_template(prompt.template or "", prompt.prompts_dir), prompt)


def _usable(template: Template, prompt: PromptConfig) -> Template:
    """Before any model time: its own examples file (unless --examples), and examples for --shots."""
    from llmlab.prompting import prompts

    if not prompt.examples:
        prompts.check_shots(template, prompt.shots or 0)  # raises examples_error first
    return template


# ---------------------------------------------------------------- generate


def _generate_items(cfg: GenerateConfig, template: Optional[Template]) -> list[Item]:
    from llmlab.io import records as io
    from llmlab.prompting import prompts

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


def generate(cfg: GenerateConfig, hooks: Hooks = Hooks(), lm: Optional[LM] = None,
             display: bool = False) -> tuple[Job, GenOutput] | None:
    """`llmlab generate`: one prompt streamed to stdout through hooks.emit, or a batch written
    record by record. display: stdout is a terminal; one prompt with --logprobs is then returned
    as (job, output) for the CLI to colour by probability, else None is returned. Piped, one prompt
    with --logprobs is written as a record (streamed text would lose the numbers)."""
    from llmlab.scoring import generation
    from llmlab.io import records as io

    cfg, template, settings, items = generate_inputs(cfg, hooks)
    single = cfg.input.path is None and cfg.output.terminal and (display or not settings.logprobs)
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume,
                     settings=io.settings_of(_logged_config(cfg, settings), template))
    todo = sink.pending(items)
    if cfg.output.resume and len(todo) < len(items):
        hooks.info(f"--resume: {len(items) - len(todo)} of {len(items)} inputs already done")
    if not todo:
        return None
    # Opened before the model loads: a log that can't be written fails before any model time.
    with hooks.open_run("generate", config=_logged_config(cfg, settings), templates=template,
                        data=cfg.input.path) as log:
        session = loaded(cfg.model, lm, log, hooks)
        jobs = _jobs(cfg, session, template, todo, settings, hooks)

        def logged(job: Job, rec: dict[str, object]) -> None:
            log.item(job.item.index, job.model_text, str(rec["completion"]), key=job.item.key,
                     extra={"input": job.item.fields, **({"completions": rec["completions"]}
                                                         if "completions" in rec else {})})

        shown = None
        if single and settings.logprobs:  # a person reads coloured tokens: nothing to stream
            output = session.lm.generate(requests(jobs[:1]), settings, batch_size=1, engine=cfg.gen_engine)[0]
            logged(jobs[0], generation.record(jobs[0], output, session.lm.name, cfg.echo))
            shown = (jobs[0], output)
        elif single:
            output = generation.run_single(session.lm, jobs[0], settings, cfg.echo, hooks.emit, cfg.gen_engine)
            logged(jobs[0], generation.record(jobs[0], output, session.lm.name, cfg.echo))
        else:
            with sink as writer, hooks.progress(len(jobs), "generating") as bar:

                def done(job: Job, output: GenOutput) -> None:
                    rec = generation.record(job, output, session.lm.name, cfg.echo)
                    writer.write(rec)
                    logged(job, rec)
                    bar.advance(1)

                run_jobs(session.lm, jobs, settings, cfg.batch_size, done, cfg.gen_engine)
        log.metrics({"items": len(jobs)})
    return shown


def generate_inputs(cfg: GenerateConfig, hooks: Hooks = Hooks()) -> tuple[GenerateConfig, Optional[Template],
                                                                          GenerationSettings, list[Item]]:
    """A generate run's checks, before any model time: (config with an adapter's defaults, template,
    settings, inputs)."""
    from llmlab.backends import hf_continuous
    from llmlab.io import records as io

    template = find_template(cfg.prompt)
    if template is not None and adapted.adapters_in(cfg.model):
        model, prompt = adapted.adapter_defaults(cfg.model, cfg.prompt, template, hooks)
        cfg = replace(cfg, model=model, prompt=prompt)
    settings = settings_for(template, cfg.preset, cfg.flags)
    hf_continuous.check(cfg.gen_engine, settings, cfg.model.backend)
    io.check_output_path(cfg.output.path, inputs=[cfg.input.path])
    if settings.logprobs and io.output_format(cfg.output.path, cfg.output.format) == "text":
        raise UsageError("--logprobs: the text format keeps only the completion; write JSONL or CSV "
                         "(-o FILE.jsonl or --format jsonl)")
    return cfg, template, settings, _generate_items(cfg, template)


def _jobs(cfg: GenerateConfig, session: "Session", template: Optional[Template], todo: list[Item],
          settings: GenerationSettings,
          hooks: Hooks) -> list[Job]:
    """The prompts to complete: a plain field (window-checked) or the template's, one per input."""
    from llmlab.scoring import generation
    from llmlab.scoring import plain

    if template is None:
        jobs = plain.jobs(todo, cfg.input.field, session.lm, session.chat())
        return plain.fit(jobs, session.lm, settings.max_new_tokens, cfg.prompt.overflow, hooks.warn)
    builder = session.builder(template, cfg.prompt, settings.max_new_tokens, cfg.input.path)
    return generation.template_jobs(builder, todo)


def loaded(model: ModelConfig, lm: Optional[LM], log: RunLog, hooks: Optional[Hooks] = None) -> "Session":
    """The session (its model loaded), with the model's name and device filled into the run log."""
    session = Session(model, lm, hooks)
    log.update(model=session.lm.name, device=str(session.lm.device))
    return session


def _logged_config(cfg: DataclassInstance, settings: GenerationSettings | None = None) -> dict[str, object]:
    """What a run was asked to do, for the run log: the typed config, plus the generation settings
    in force (template defaults, preset and flags merged)."""
    import dataclasses

    logged = dataclasses.asdict(cfg)
    logged.pop("text", None)  # the prompt itself is logged as the item
    if settings is not None:
        is_instance = dataclasses.is_dataclass(settings) and not isinstance(settings, type)
        logged["settings"] = dataclasses.asdict(settings) if is_instance else vars(settings)
    return logged


def requests(jobs: Sequence[Job]) -> list[GenRequest]:
    """The backend's requests: the model text, and whether it is already templated (no special
    tokens added)."""
    from llmlab.backends.models import GenRequest

    return [GenRequest(j.model_text, j.chat) for j in jobs]


def run_jobs(lm: LM, jobs: Sequence[Job], settings: GenerationSettings, batch_size: Optional[int],
             done: Callable[[Job, GenOutput], None], engine: str = "auto") -> list[GenOutput]:
    """Generate for every job; done(job, output) is called in input order as results arrive.
    engine: --gen-engine (auto, padded, continuous)."""
    return lm.generate(requests(jobs), settings, batch_size=batch_size, engine=engine,
                       on_output=lambda index, output: done(jobs[index], output))


# ---------------------------------------------------------------- classify


def classify(cfg: ClassifyConfig, hooks: Hooks = Hooks(), table: bool = False, lm: Optional[LM] = None,
             items: Optional[list[Item]] = None) -> tuple[list[Classification], Classifier] | None:
    """`llmlab classify`: returns (results, classifier) when `table` (a person reads them), else
    writes one record per input as it is done and returns None. items: the inputs, given (the server)."""
    from llmlab.scoring import classify as clf
    from llmlab.io import records as io

    cfg, template, items = classify_inputs(cfg, items, hooks)
    settings = settings_for(template)
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume, text_key="prediction",
                     settings=io.settings_of(_logged_config(cfg), template))
    todo = sink.pending(items)
    if not todo:
        return None
    mode = resolve.calibration(cfg.calibrate, template, cfg.method, cfg.probe.data if cfg.probe else None).value
    if mode == "batch" and len(todo) < 2:
        raise UsageError("--calibration batch estimates the bias from the inputs themselves: give several "
                         "(--input FILE), or use contextual or domain for one input")
    source = probe_source(cfg.probe, mode, template, hooks)
    with hooks.open_run("classify", config=_logged_config(cfg), templates=template, data=cfg.input.path) as log:
        session = loaded(cfg.model, lm, log, hooks)
        builder = session.builder(template, cfg.prompt, settings.max_new_tokens, cfg.input.path)
        classifier = clf.Classifier(session.lm, builder, cfg.method, cfg.normalize, mode, cfg.batch_size,
                                    settings, cfg.ensemble, hooks.detail, source, session.scores)
        for draw in range(cfg.ensemble if source else 0):
            classifier.probe(draw)  # fitted (or loaded) before the classifying bar starts
        # Results are handed on per chunk: small chunks keep the progress bar true to the work done.
        chunk = 2 * (cfg.batch_size or 16)
        with contextlib.ExitStack() as stack:
            writer = None if table else stack.enter_context(sink)
            bar = stack.enter_context(hooks.progress(len(todo), "classifying"))

            def done(r: Classification) -> None:
                if writer is not None:
                    writer.write(clf.record(r, template, session.lm.name))
                log.item(r.item.index, r.prompt, r.completion, r.prediction, r.probabilities,
                         r.item.fields.get(template.target) if template.target else None, {"input": r.item.fields},
                         key=r.item.key)
                bar.advance(1)

            results = classifier.classify(todo, on_result=done, chunk=chunk)
        log.metrics(clf.run_metrics(results, template))
    return results, classifier


def classify_inputs(cfg: ClassifyConfig, items: Optional[list[Item]] = None,
                    hooks: Hooks = Hooks()) -> tuple[ClassifyConfig, Template, list[Item]]:
    """A classify run's checks, before any model time: (config with an adapter's defaults, template,
    inputs); items: given (the server)."""
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    template = required_template(cfg.prompt)
    if template.task != "classify":
        raise UsageError(f"template '{template.name}' is a generate template; classify needs task: classify with labels")
    if adapted.adapters_in(cfg.model):  # an adapter scores the prompts it was trained on, uncalibrated by default
        model, prompt = adapted.adapter_defaults(cfg.model, cfg.prompt, template, hooks)
        cfg = replace(cfg, model=model, prompt=prompt,
                      calibrate=cfg.calibrate or ("probe" if cfg.probe and cfg.probe.data else "off"))
    io.check_output_path(cfg.output.path, inputs=[cfg.input.path])
    if items is None and cfg.input.path is not None:
        if cfg.text is not None or cfg.prompt.vars:
            raise UsageError("give either a TEXT argument (or --var) or --input FILE, not both")
        items = read_input(cfg.input.path, cfg.input.format, template.fields[0], cfg.input.offset, cfg.input.limit)
    elif items is None:
        items = [template_item(template, single_prompt(cfg.text), cfg.prompt.vars, "classify")]
    prompts.require_fields(items, template)
    return cfg, template, items
