"""The command line. Declares options and calls library functions; the only place that turns
LlmlabError into exit codes. Heavy libraries (torch, transformers) load inside commands only."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click; its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exceptions

from llmlab import __version__, console
from llmlab.errors import LlmlabError, UsageError

MODEL_PANEL = "Model"
GEN_PANEL = "Generation settings"
IO_PANEL = "Input and output"
PROMPT_PANEL = "Prompt building"


class LlmlabGroup(TyperGroup):
    """Runs commands and maps every failure to one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        debug = os.environ.get("LLMLAB_DEBUG", "") not in ("", "0")
        try:
            code = super().main(args, prog_name or "llmlab", complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()  # bare `llmlab` or `llmlab prompt`: print the help
            code = exc.exit_code
        except click_exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            console.error(f"{exc.format_message()}{hint}")
            code = exc.exit_code
        except click_exceptions.ClickException as exc:
            console.error(exc.format_message())
            code = exc.exit_code
        except typer.Abort:
            code = 130
        except LlmlabError as exc:
            if debug:
                raise
            console.error(str(exc))
            code = exc.exit_code
        except BrokenPipeError:
            sys.stderr.close()
            code = 1
        except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if debug:
                raise
            console.error(f"{type(exc).__name__}: {exc} (set LLMLAB_DEBUG=1 for the traceback)")
            code = 1
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


app = typer.Typer(
    cls=LlmlabGroup,
    name="llmlab",
    help="A prompt-engineering lab: generate, classify and evaluate with Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"llmlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """A prompt-engineering lab: generate, classify and evaluate with Hugging Face models.

    With no --model, everything runs offline on the embedded SmolLM2-135M-Instruct.
    """


# ---------------------------------------------------------------- shared options

Model = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", envvar="LLMLAB_MODEL", rich_help_panel=MODEL_PANEL, show_default="smollm2",
        help="Hub id (google/flan-t5-base, gpt2...), a save_pretrained folder, a .gguf file, or an alias: "
        "smollm2 (embedded, offline), flan-t5-small|base|large.",
    ),
]
Device = Annotated[
    str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", rich_help_panel=MODEL_PANEL)
]
Dtype = Annotated[
    str, typer.Option(help="auto (bfloat16 on a GPU that supports it, float32 on CPU), float32, bfloat16, float16.",
                      rich_help_panel=MODEL_PANEL)
]
Chat = Annotated[
    Optional[str], typer.Option(help="Wrap prompts in the model's chat template: auto (when it has one), on, off. "
                                "[default: the template's, else auto]", rich_help_panel=MODEL_PANEL)
]


def _chat(tokenizer: Any, chat: Optional[str], template: Any = None) -> bool:
    from llmlab import generation

    return generation.use_chat(tokenizer, chat or (template.chat if template is not None else None) or "auto")
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, logs or warnings on stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Logs on stderr even when it is not a terminal.")]

MaxNewTokens = Annotated[
    Optional[int], typer.Option(help="Most tokens to add after the prompt (>= 1). [default: 64]", rich_help_panel=GEN_PANEL)
]
Greedy = Annotated[
    Optional[bool],
    typer.Option("--greedy/--sample", show_default=False, rich_help_panel=GEN_PANEL,
                 help="Greedy (default): always take the most likely next token, deterministic. "
                 "Sample: draw the next token at random from the distribution shaped by temperature, "
                 "top-k and top-p (setting any of those implies --sample)."),
]
Temperature = Annotated[
    Optional[float], typer.Option(rich_help_panel=GEN_PANEL,
                                  help="Sampling temperature >= 0: 1.0 leaves the distribution unchanged, "
                                  "< 1 sharpens it (safer, more repetitive), > 1 flattens it (more creative, "
                                  "more errors); 0 = greedy. [default: 1.0]")
]
TopK = Annotated[
    Optional[int], typer.Option(rich_help_panel=GEN_PANEL,
                                help="Sample only among the k most likely tokens (>= 0, 0 = no limit). [default: 0]")
]
TopP = Annotated[
    Optional[float], typer.Option(rich_help_panel=GEN_PANEL,
                                  help="Nucleus sampling: only the most likely tokens whose probabilities add up "
                                  "to p, in (0, 1]; 1 = no limit. [default: 1.0]")
]
RepetitionPenalty = Annotated[
    Optional[float], typer.Option(rich_help_panel=GEN_PANEL,
                                  help="> 1 discourages repeating tokens already present; 1 = none. [default: 1.0]")
]
NumBeams = Annotated[
    Optional[int], typer.Option(rich_help_panel=GEN_PANEL,
                                help="Beam search width (>= 1): keep this many candidate sequences. [default: 1]")
]
NumReturn = Annotated[
    Optional[int], typer.Option("--num-return-sequences", "-n", rich_help_panel=GEN_PANEL,
                                help="Completions per prompt (needs --sample or --num-beams >= n). [default: 1]")
]
Seed = Annotated[
    Optional[int], typer.Option(rich_help_panel=GEN_PANEL,
                                help="Random seed: the same seed gives the same samples run to run.")
]
Stop = Annotated[
    Optional[list[str]], typer.Option(rich_help_panel=GEN_PANEL,
                                      help="Stop text (repeatable): the completion is cut before it.")
]
ConfigFile = Annotated[
    Optional[Path], typer.Option("--config", rich_help_panel=GEN_PANEL,
                                 help="YAML preset of generation settings (same names as the flags); flags override it.")
]

InputFile = Annotated[
    Optional[str], typer.Option("--input", "-i", rich_help_panel=IO_PANEL,
                                help="Batch input: JSONL, CSV (with header) or text (one prompt per line); - = stdin.")
]
InputFormat = Annotated[
    str, typer.Option(rich_help_panel=IO_PANEL, help="auto (from the extension or content), jsonl, csv, tsv, text.")
]
OutputFile = Annotated[
    Optional[str], typer.Option("--output", "-o", rich_help_panel=IO_PANEL,
                                help="Write results here (.jsonl, .csv or .txt) instead of stdout.")
]
OutputFormat = Annotated[
    str, typer.Option("--format", "-f", rich_help_panel=IO_PANEL,
                      help="auto (from --output's extension; JSONL otherwise), jsonl, csv, text.")
]
BatchSize = Annotated[
    str, typer.Option(rich_help_panel=IO_PANEL,
                      help="Inputs per forward pass, or auto (start large, halve on out-of-memory).")
]


def _batch_size(text: str) -> Optional[int]:
    """--batch-size: an integer >= 1, or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"invalid --batch-size '{text}': give an integer >= 1 or auto")
    return value
Resume = Annotated[
    bool, typer.Option(rich_help_panel=IO_PANEL,
                       help="Skip inputs already in --output (matched by id, else by position) and append.")
]


TemplateOpt = Annotated[
    Optional[str], typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL,
                                help="A prompt template: a name from `llmlab prompt list` or a .yaml path.")
]
Shots = Annotated[
    int, typer.Option(rich_help_panel=PROMPT_PANEL,
                      help="Demonstrations in the prompt: 0 = zero-shot, 1 = one-shot, N = few-shot.")
]
ShotSelection = Annotated[
    Optional[str], typer.Option(rich_help_panel=PROMPT_PANEL,
                      help="Which examples: first (pool order), random (seeded), balanced (round-robin over "
                      "labels, so classes are mixed), similar (the k nearest to each input; similar-tfidf or "
                      "similar-hidden picks the measure). [default: the template's, else balanced for classify "
                      "templates, else first]")
]
ShotSeed = Annotated[
    Optional[int], typer.Option("--seed", rich_help_panel=PROMPT_PANEL,
                                help="Seed for random/balanced shot draws (and sampling). [default: 0 for shots]")
]
ShotFormat = Annotated[
    Optional[str], typer.Option(rich_help_panel=PROMPT_PANEL,
                                help="With a chat template: demonstrations as user/assistant turns, or inline in "
                                "one user turn. [default: the template's, else turns]")
]
Overflow = Annotated[
    str, typer.Option(rich_help_panel=PROMPT_PANEL,
                      help="A prompt too long for the context window: drop-shots (remove demonstrations, "
                      "warn), truncate (cut the input from the left, warn), or error.")
]
Examples = Annotated[
    Optional[str], typer.Option(rich_help_panel=PROMPT_PANEL,
                                help="Demonstration pool (JSONL/CSV) instead of the template's examples.")
]
PromptsDir = Annotated[
    Optional[list[str]], typer.Option(rich_help_panel=PROMPT_PANEL, envvar="LLMLAB_PROMPTS_DIR",
                                      help="More folders of templates (repeatable; also LLMLAB_PROMPTS).")
]
Vars = Annotated[
    Optional[list[str]], typer.Option("--var", rich_help_panel=PROMPT_PANEL,
                                      help="A template field for a single input: field=value (repeatable).")
]


def _settings(config: Optional[Path], flags: dict[str, Any], template: Any = None):
    from llmlab import settings

    layers = []
    if template is not None and template.generation:
        layers.append(settings.normalize_keys(template.generation, f"template '{template.name}'"))
    if config:
        layers.append(settings.load_preset(config))
    return settings.build(*layers, flags)


def _template_items(template: Any, prompt: Optional[str], var: Optional[list[str]]) -> list[Any]:
    """A single item for a template: from --var field=value, or the argument for a one-field template."""
    from llmlab import io, prompts

    values = prompts.parse_vars(var or [])
    if prompt is not None:
        fields = [f for f in template.fields if f not in values]
        if len(fields) != 1:
            raise UsageError(
                f"template '{template.name}' has fields {', '.join(template.fields)}: give them with --var field=value"
            )
        values[fields[0]] = prompt
    if not values:
        raise UsageError(f"no input for template '{template.name}': use --input FILE or --var "
                         f"{template.fields[0]}=... (fields: {', '.join(template.fields)})")
    return [io.Item(0, values, "--var")]


def _single_prompt(prompt: Optional[str]) -> Optional[str]:
    """The prompt from the argument, else from piped stdin, else None."""
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        return None
    text = sys.stdin.read()
    return text.rstrip("\n") if text.strip() else None


# ---------------------------------------------------------------- generate


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. Omit it to read stdin or use --input.")] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    chat: Chat = None,
    max_new_tokens: MaxNewTokens = None,
    greedy: Greedy = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: RepetitionPenalty = None,
    num_beams: NumBeams = None,
    num_return_sequences: NumReturn = None,
    seed: Seed = None,
    stop: Stop = None,
    config: ConfigFile = None,
    input: InputFile = None,
    input_format: InputFormat = "auto",
    field: Annotated[str, typer.Option(rich_help_panel=IO_PANEL, help="Input field holding the prompt.")] = "prompt",
    output: OutputFile = None,
    format: OutputFormat = "auto",
    batch_size: BatchSize = "8",
    resume: Resume = False,
    echo: Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Print the prompt before the completion.")] = False,
    template: TemplateOpt = None,
    shots: Shots = 0,
    shot_selection: ShotSelection = None,
    shot_format: ShotFormat = None,
    overflow: Overflow = "drop-shots",
    examples: Examples = None,
    prompts_dir: PromptsDir = None,
    var: Vars = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Complete prompts: one from the argument or stdin (streamed), or a batch from --input (JSONL out).

    With --template, prompts are built from a template file with --shots demonstrations.
    """
    from llmlab import generation, io, prompts

    console.configure(quiet, verbose)
    size = _batch_size(batch_size)
    tmpl = prompts.find_template(template, prompts_dir or []) if template else None
    settings = _settings(config, dict(
        max_new_tokens=max_new_tokens, do_sample=None if greedy is None else not greedy,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop or None,
    ), tmpl)
    if input is not None and (prompt is not None or var):
        raise UsageError("give either a PROMPT argument (or --var) or --input FILE, not both")
    if input is not None:
        items = io.read_items(input, input_format, text_field=field)
        io.check_unique_ids(items)
        if tmpl is None:
            io.require_field(items, field)
        else:
            prompts.require_fields(items, tmpl)
        single = False
    elif tmpl is not None:
        items = _template_items(tmpl, prompt if prompt is not None else _single_prompt(None), var)
        single = output is None and format == "auto"
    else:
        text = _single_prompt(prompt)
        if text is None:
            raise UsageError('no prompt: run llmlab generate "your prompt", pipe one on stdin, or use --input FILE')
        items = [io.Item(0, {field: text}, "the prompt")]
        single = output is None and format == "auto"
    sink = io.Output(output, format, resume=resume)
    todo = [it for it in items if it.key not in sink.done]
    if resume and len(todo) < len(items):
        console.info(f"--resume: {len(items) - len(todo)} of {len(items)} inputs already done")
    if not todo:
        return
    from llmlab import models

    if tmpl is None:
        lm = models.load(model, device, dtype)
        jobs = generation.plain_jobs(todo, field, lm.tokenizer, _chat(lm.tokenizer, chat))
    else:
        lm, builder = _load_for_template(model, device, dtype, chat, tmpl, shots, shot_selection, seed, shot_format,
                                         overflow, settings.max_new_tokens, examples, input)
        jobs = generation.template_jobs(builder, todo)
    if single:
        generation.run_single(lm, jobs[0], settings, echo)
        return
    with sink as writer:
        generation.run_batch(lm, jobs, settings, writer, size, echo)


CLASSIFY_PANEL = "Classification"
Ensemble = Annotated[
    int, typer.Option(min=1, rich_help_panel=CLASSIFY_PANEL,
                      help="Average label probabilities over N demonstration draws (other seeds; for first and "
                      "similar, other orders).")
]
Method = Annotated[
    str, typer.Option(rich_help_panel=CLASSIFY_PANEL,
                      help="score: each label's log-likelihood as the continuation (multiple choice); "
                      "generate: generate text and take the first label it mentions.")
]
Normalize = Annotated[
    str, typer.Option(rich_help_panel=CLASSIFY_PANEL,
                      help="Label scores: none (sum of token log-probs) or length (mean per token).")
]


def _load_for_template(model, device, dtype, chat, template, shots, shot_selection, seed, shot_format,
                       overflow, max_new_tokens, examples, input):
    from llmlab import models, prompts

    lm = models.load(model, device, dtype)
    options = prompts.options_for(template, shots, shot_selection, seed, _chat(lm.tokenizer, chat, template),
                                  shot_format, overflow, max_new_tokens)
    builder = prompts.make_builder(template, lm.tokenizer, lm.window, options, examples, input, lm.is_encoder_decoder,
                                   lm=lm)
    return lm, builder


@app.command()
def classify(
    text: Annotated[Optional[str], typer.Argument(help="The input for a one-field template. Omit it to read stdin or use --input.")] = None,
    template: Annotated[str, typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL,
                                          help="A classify template: name or .yaml path.")] = ...,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    chat: Chat = None,
    method: Method = "score",
    normalize: Normalize = "none",
    calibrate: Annotated[bool, typer.Option(rich_help_panel=CLASSIFY_PANEL,
                                            help="Contextual calibration: divide out the label bias measured on "
                                            "content-free inputs (N/A, empty, [MASK]); -v shows it.")] = False,
    calibration: Annotated[Optional[str], typer.Option(rich_help_panel=CLASSIFY_PANEL,
                                                       help="Calibration method: off, contextual (same as "
                                                       "--calibrate), batch (bias = mean over the inputs), domain "
                                                       "(random in-domain words).")] = None,
    ensemble: Ensemble = 1,
    shots: Shots = 0,
    shot_selection: ShotSelection = None,
    seed: ShotSeed = None,
    shot_format: ShotFormat = None,
    overflow: Overflow = "drop-shots",
    examples: Examples = None,
    prompts_dir: PromptsDir = None,
    var: Vars = None,
    input: InputFile = None,
    input_format: InputFormat = "auto",
    output: OutputFile = None,
    format: OutputFormat = "auto",
    batch_size: BatchSize = "16",
    resume: Resume = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Pick a label for each input by scoring every label's text after the prompt."""
    from llmlab import classify as classify_mod, io, prompts

    console.configure(quiet, verbose)
    tmpl = prompts.find_template(template, prompts_dir or [])
    if tmpl.task != "classify":
        raise UsageError(f"template '{tmpl.name}' is a generate template; classify needs task: classify with labels")
    settings = _settings(None, {}, tmpl)
    mode = classify_mod.calibration_mode(calibration or calibrate)
    if input is not None and (text is not None or var):
        raise UsageError("give either a TEXT argument (or --var) or --input FILE, not both")
    if input is not None:
        items = io.read_items(input, input_format, text_field=tmpl.fields[0])
        io.check_unique_ids(items)
    else:
        items = _template_items(tmpl, text if text is not None else _single_prompt(None), var)
    prompts.require_fields(items, tmpl)
    sink = io.Output(output, format, resume=resume, text_key="prediction")
    todo = [it for it in items if it.key not in sink.done]
    if not todo:
        return
    if mode == "batch" and len(todo) < 2:
        raise UsageError("--calibration batch estimates the bias from the inputs themselves: give several "
                         "(--input FILE), or use contextual or domain for one input")
    lm, builder = _load_for_template(model, device, dtype, chat, tmpl, shots, shot_selection, seed, shot_format,
                                     overflow, settings.max_new_tokens, examples, input)
    classifier = classify_mod.Classifier(lm, builder, method, normalize, mode, _batch_size(batch_size), settings,
                                         ensemble)
    if output is None and format == "auto" and sys.stdout.isatty():
        results = classifier.classify(todo)
        _classification_table(results, classifier)
        return
    with sink as writer, console.progress(len(todo), "classifying") as bar:
        def done(result):
            writer.write(classify_mod.record(result, tmpl, lm.name))
            bar.advance(1)

        classifier.classify(todo, on_result=done)


def _classification_table(results, classifier) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("#", "input", "prediction", *classifier.labels)
    field = classifier.template.fields[0]
    for r in results:
        shown = str(r.item.fields.get(field, ""))
        table.add_row(str(r.item.index), shown if len(shown) <= 60 else shown[:57] + "...", r.prediction,
                      *(f"{r.probabilities[label]:.3f}" for label in classifier.labels))
    Console().print(table)


@app.command("eval")
def eval_cmd(
    template: Annotated[list[str], typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL,
                                                help="Template(s) to evaluate (repeatable).")] = ...,
    data: Annotated[str, typer.Option(rich_help_panel=IO_PANEL, help="Labeled data: JSONL or CSV (- = stdin).")] = ...,
    shots: Annotated[str, typer.Option(rich_help_panel=PROMPT_PANEL, help="Shot counts to compare, e.g. 0,1,4,8.")] = "0",
    seeds: Annotated[int, typer.Option(min=1, rich_help_panel=PROMPT_PANEL,
                                       help="Demonstration draws per shot count (seeds 0..N-1); mean ± std.")] = 1,
    calibration: Annotated[str, typer.Option(rich_help_panel=CLASSIFY_PANEL,
                                             help="Calibration methods to compare, comma-separated: off, "
                                             "contextual, batch, domain (on = contextual, both = off,contextual)."
                                             )] = "off",
    calibrate: Annotated[bool, typer.Option(rich_help_panel=CLASSIFY_PANEL, help="Same as --calibration on.")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, rich_help_panel=IO_PANEL, help="Use only the first N rows.")] = None,
    report: Annotated[Optional[str], typer.Option(rich_help_panel=IO_PANEL,
                                                  help="Write the whole result as JSON: config, model, template text, "
                                                  "metrics, versions.")] = None,
    log_samples: Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Put per-item predictions in the report.")] = False,
    reference: Annotated[Optional[list[str]], typer.Option(rich_help_panel=IO_PANEL,
                                                           help="Reference field(s) for generate templates (repeatable).")] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    chat: Chat = None,
    method: Method = "score",
    normalize: Normalize = "none",
    ensemble: Ensemble = 1,
    shot_selection: ShotSelection = None,
    shot_format: ShotFormat = None,
    overflow: Overflow = "drop-shots",
    examples: Examples = None,
    prompts_dir: PromptsDir = None,
    max_new_tokens: MaxNewTokens = None,
    batch_size: BatchSize = "16",
    input_format: InputFormat = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Measure prompt files on labeled data: every template x shot count x seed x calibration, one table."""
    from llmlab import evaluate, io, models, prompts

    console.configure(quiet, verbose)
    templates = [prompts.find_template(t, prompts_dir or []) for t in template]
    shot_counts = evaluate.parse_shots(shots)
    if calibrate:
        calibration = "on"
    evaluate.plan(templates, shot_counts, seeds, calibration, method)  # validates the options early
    items = io.read_items(data, input_format)
    if limit:
        items = items[:limit]
    refs = evaluate.validate(items, templates, reference or [])
    if report:
        evaluate.check_report_path(report)
    lm = models.load(model, device, dtype)
    options = {
        "data": data, "limit": limit, "method": method, "normalize": normalize, "batch_size": _batch_size(batch_size),
        "shot_selection": shot_selection, "shot_format": shot_format, "overflow": overflow,
        "examples": examples, "references": reference or [], "log_samples": log_samples,
        "chat": chat, "generation": {"max_new_tokens": max_new_tokens}, "ensemble": ensemble,
    }
    result = evaluate.evaluate(lm, templates, items, shot_counts, seeds, calibration, options, refs=refs)
    if report:
        evaluate.write_report(report, result)
    headers, rows = evaluate.table_rows(result)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, title=f"{lm.name} on {data} ({len(items)} items)")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        sys.stdout.write(evaluate.plain_table(headers, rows))


prompt_app = typer.Typer(help="Prompt templates: list them, render the exact prompts.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")


@prompt_app.command("list")
def prompt_list(
    prompts_dir: PromptsDir = None,
    format: Annotated[str, typer.Option("--format", "-f", help="auto (a table on a terminal), text (tab-separated), jsonl.")] = "auto",
) -> None:
    """List the templates in prompts/, --prompts-dir and LLMLAB_PROMPTS: name, task, description."""
    import json

    from llmlab import prompts

    found = prompts.list_templates(prompts_dir or [])
    if format == "auto" and sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "task", "examples", "description", "file")
        for t in found:
            table.add_row(t.name, t.task, str(len(t.examples)), t.description, str(t.path))
        Console().print(table)
        return
    for t in found:
        if format == "jsonl":
            print(json.dumps({"name": t.name, "task": t.task, "examples": len(t.examples),
                              "description": t.description, "path": str(t.path)}))
        else:
            print(f"{t.name}\t{t.task}\t{t.description}")


@prompt_app.command("render")
def prompt_render(
    template: Annotated[str, typer.Argument(help="Template name (see `llmlab prompt list`) or .yaml path.")],
    input: InputFile = None,
    input_format: InputFormat = "auto",
    var: Vars = None,
    shots: Shots = 0,
    shot_selection: ShotSelection = None,
    seed: ShotSeed = None,
    shot_format: ShotFormat = None,
    overflow: Overflow = "drop-shots",
    examples: Examples = None,
    prompts_dir: PromptsDir = None,
    model: Model = None,
    chat: Chat = None,
    max_new_tokens: MaxNewTokens = None,
    format: Annotated[str, typer.Option("--format", "-f", rich_help_panel=IO_PANEL,
                                        help="text (prompts separated by a line of dashes) or jsonl.")] = "text",
    quiet: Quiet = False,
) -> None:
    """Print the exact prompt(s) the model would see (chat template included), with token counts on
    stderr. Loads only the tokenizer, never the weights."""
    import json

    from llmlab import io, models, prompts

    console.configure(quiet, False)
    if format not in ("text", "jsonl"):
        raise UsageError(f"invalid --format '{format}': choose text or jsonl")
    tmpl = prompts.find_template(template, prompts_dir or [])
    items = io.read_items(input, input_format) if input else _template_items(tmpl, None, var)
    tokenizer, window, encoder_decoder = models.load_tokenizer(model)
    settings = _settings(None, {"max_new_tokens": max_new_tokens}, tmpl)
    options = prompts.options_for(tmpl, shots, shot_selection, seed, _chat(tokenizer, chat, tmpl),
                                  shot_format, overflow, settings.max_new_tokens)
    builder = prompts.make_builder(tmpl, tokenizer, window, options, examples, input, encoder_decoder)
    limit = f" of {window}" if window else ""
    for n, item in enumerate(items):
        built = builder.build(item)
        for note in built.notes:
            console.warn(note)
        console.note(f"{item.source}: {built.tokens} tokens{limit} ({len(built.shots)} shots)")
        if format == "jsonl":
            print(json.dumps({"index": item.index, **item.fields, "prompt": built.text, "tokens": built.tokens,
                              "shots": len(built.shots)}, ensure_ascii=False), flush=True)
        else:
            print(("-" * 40 + "\n" if n else "") + built.text, flush=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
