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
    str, typer.Option(help="Wrap prompts in the model's chat template: auto (when it has one), on, off.",
                      rich_help_panel=MODEL_PANEL)
]
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
BatchSize = Annotated[int, typer.Option(min=1, rich_help_panel=IO_PANEL, help="Inputs per forward pass.")]
Resume = Annotated[
    bool, typer.Option(rich_help_panel=IO_PANEL,
                       help="Skip inputs already in --output (matched by id, else by position) and append.")
]


def _settings(config: Optional[Path], flags: dict[str, Any]):
    from llmlab import settings

    preset = settings.load_preset(config) if config else {}
    return settings.build(preset, flags)


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
    chat: Chat = "auto",
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
    batch_size: BatchSize = 8,
    resume: Resume = False,
    echo: Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Print the prompt before the completion.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Complete prompts: one from the argument or stdin (streamed), or a batch from --input (JSONL out)."""
    from llmlab import generation, io

    console.configure(quiet, verbose)
    settings = _settings(config, dict(
        max_new_tokens=max_new_tokens, do_sample=None if greedy is None else not greedy,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop or None,
    ))
    if input is not None and prompt is not None:
        raise UsageError("give either a PROMPT argument or --input FILE, not both")
    if input is not None:
        items = io.read_items(input, input_format, text_field=field)
        io.require_field(items, field)
        single = False
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

    lm = models.load(model, device, dtype)
    jobs = generation.plain_jobs(todo, field, lm.tokenizer, generation.use_chat(lm.tokenizer, chat))
    if single:
        generation.run_single(lm, jobs[0], settings, echo)
        return
    with sink as writer:
        generation.run_batch(lm, jobs, settings, writer, batch_size, echo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
