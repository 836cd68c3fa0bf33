"""The command line. Each command parses its options into a typed config (llmlab.core.config) and calls one
library function; tables come from llmlab.io.render. The only place that turns LlmlabError into exit
codes, and the owner of stderr: library code reports progress and warnings through session.Hooks.
Heavy libraries (torch, transformers) load inside commands only."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click; its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exceptions

from llmlab import __version__
from llmlab.core import console
from llmlab.core.config import (Backend, Dtype, GenEngine, InputFormat, Method, Normalize, OutputFormat, Overflow, ProbeConfig,
                           value)
from llmlab.core.errors import LlmlabError, UsageError
from llmlab.commands.options import *  # noqa: F403 - the shared option declarations


_display_type = TyperOption.display_type_rich


def _no_flag_types(self: TyperOption, ctx: Any) -> Optional[str]:
    """--help: no `<bool>` label on on/off flags (they take no value)."""
    return None if getattr(self, "is_flag", False) else _display_type(self, ctx)


TyperOption.display_type_rich = _no_flag_types  # type: ignore[method-assign]


_ARGS: list[str] = []  # this run's command line after `llmlab`: the run log records it, eval --processes re-runs it


class LlmlabGroup(TyperGroup):
    """Runs commands and maps every failure to one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        debug = os.environ.get("LLMLAB_DEBUG", "") not in ("", "0")
        global _ARGS
        _ARGS = [str(a) for a in (sys.argv[1:] if args is None else args)]  # eval --processes re-runs them
        try:
            code = super().main(args, prog_name or "llmlab", complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()  # bare `llmlab` or `llmlab prompt`: print the help
            code = exc.exit_code
        except click_exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            console.error(f"{exc.format_message().replace('Value error, ', '')}{hint}")
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




def hooks(no_log: bool = False):
    """Library callbacks that write to stderr through the console (progress only on a terminal),
    and record the run in the run log with this command line (unless --no-log / LLMLAB_LOG=0)."""
    from llmlab.runs import runlog
    from llmlab.orchestration.session import Hooks

    def open_run(command: str, **details: Any) -> Any:
        return runlog.open_run(command, ["llmlab", *_ARGS], no_log=no_log, on_warn=console.warn, **details)

    return Hooks(progress=console.progress, warn=console.warn, info=console.info, note=console.note,
                 detail=console.detail, open_run=open_run, emit=console.emit)


def _model(model, device, dtype, chat, device_map=None, max_memory=None, backend="hf", tensor_parallel_size=1):
    """The model options, checked before any model time (placement options: llmlab.backends.placement)."""
    from llmlab.backends import placement
    from llmlab.core.config import ModelConfig

    cfg = ModelConfig(model, device, value(dtype), value(chat), placement.parse_device_map(device_map),
                      placement.parse_max_memory(max_memory), value(backend), tensor_parallel_size)
    if cfg.backend == "vllm":
        from llmlab.backends import vllm

        vllm.check_options(cfg)
    else:
        placement.check(device, cfg.device_map, cfg.max_memory)
        if tensor_parallel_size != 1:
            raise UsageError("--tensor-parallel-size needs --backend vllm; with hf use --device-map auto")
    return cfg


def _dry_run(cfg) -> None:
    """--dry-run: the placement --device-map (default auto) would give, on stdout; then exit."""
    from llmlab.backends import loading

    if cfg.backend == "vllm":
        raise UsageError("--dry-run shows accelerate placements (--backend hf); vLLM places models itself")
    for line in loading.placement_plan(cfg.spec, cfg.dtype, cfg.device_map or "auto", cfg.max_memory):
        print(line)
    raise typer.Exit(0)


def _prompt(template, shots=None, selection=None, seed=None, shot_format=None, overflow=Overflow.drop_shots,
            examples=None, prompts_dir=None, var=None):
    from llmlab.core.config import PromptConfig

    return PromptConfig(template, shots, value(selection), seed, value(shot_format), value(overflow), examples,
                        list(prompts_dir or []), list(var or []))


# ---------------------------------------------------------------- generate


PromptArg = Annotated[Optional[str], typer.Argument(help="The prompt. Omit it to read stdin or use --input.",
                                                   show_default=False)]
PromptField = Annotated[str, typer.Option("--field", rich_help_panel=IO_PANEL, help="Input field holding the prompt.")]
Echo = Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Print the prompt before the completion.")]


@app.command()
def generate(
    prompt: PromptArg = None,
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf,
    tensor_parallel_size: TensorParallel = 1, dry_run: DryRun = False,
    max_new_tokens: MaxNewTokens = None, greedy: Greedy = None, temperature: Temperature = None, top_k: TopK = None,
    top_p: TopP = None, repetition_penalty: RepetitionPenalty = None, num_beams: NumBeams = None,
    num_return_sequences: NumReturn = None, seed: Seed = None, stop: Stop = None, logprobs: Logprobs = None,
    top_logprobs: TopLogprobs = None, config: ConfigFile = None,
    input: InputFile = None, input_format: InputFormatOpt = InputFormat.auto, field: PromptField = "prompt",
    offset: Offset = 0, limit: Limit = None, output: OutputFile = None, format: OutputFormatOpt = OutputFormat.auto,
    batch_size: BatchSize = "8", gen_engine: GenEngineOpt = GenEngine.auto, resume: Resume = False, echo: Echo = False,
    template: TemplateOpt = None, shots: Shots = None, shot_selection: ShotSelection = None,
    shot_format: ShotFormatOpt = None, overflow: OverflowOpt = Overflow.drop_shots, examples: Examples = None,
    prompts_dir: PromptsDir = None, var: Vars = None,
    no_log: NoLog = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Complete prompts: one from the argument or stdin (streamed), or a batch from --input (JSONL out).

    With --template, prompts are built from a template file with --shots demonstrations.
    """
    from llmlab.orchestration import session
    from llmlab.core.config import GenerateConfig, InputConfig, OutputConfig, batch_size as parse_batch

    console.configure(quiet, verbose)
    model_cfg = _model(model, device, dtype, chat, device_map, max_memory, backend, tensor_parallel_size)
    if dry_run:
        _dry_run(model_cfg)
    flags = dict(max_new_tokens=max_new_tokens, do_sample=None if greedy is None else not greedy,
                 temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                 num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop or None,
                 logprobs=logprobs, top_logprobs=top_logprobs)
    cfg = GenerateConfig(
        model=model_cfg,
        prompt=_prompt(template, shots, shot_selection, seed, shot_format, overflow, examples, prompts_dir, var),
        input=InputConfig(input, value(input_format), field, offset, limit),
        output=OutputConfig(output, value(format), resume),
        flags=flags, preset=config, text=prompt, batch_size=parse_batch(batch_size), echo=echo,
        gen_engine=value(gen_engine),
    )
    shown = session.generate(cfg, hooks(no_log), display=console.stdout_is_terminal())
    if shown is not None:  # --logprobs on a terminal: colour each token by its probability
        from llmlab.io import render

        render.token_probabilities(*shown, echo=echo)


# ---------------------------------------------------------------- classify


TextArg = Annotated[Optional[str], typer.Argument(help="The input for a one-field template. Omit it to read stdin "
                                                 "or use --input.", show_default=False)]
ClassifyTemplate = Annotated[str, typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL, show_default=False,
                                               help="A classify template: name or .yaml path. [required]")]
CalibrateFlag = Annotated[bool, typer.Option("--calibrate", rich_help_panel=CLASSIFY_PANEL,
                                             help="Contextual calibration: divide out the label bias measured on "
                                             "content-free inputs (N/A, empty, [MASK]); -v shows it. Same as "
                                             "--calibration contextual.")]
Calibration = Annotated[Optional[str], typer.Option("--calibration", rich_help_panel=CLASSIFY_PANEL,
                                                    show_default="the template's calibrate:, else off",
                                                    help="Calibration method: off, contextual (Zhao et al. 2021), "
                                                    "batch (Zhou et al. 2024: the bias is the mean over the "
                                                    "inputs), domain (Fei et al. 2023: random in-domain words), "
                                                    "probe (a probe on the hidden states, fit on --probe-data).")]


@app.command()
def classify(
    text: TextArg = None, template: ClassifyTemplate = ...,
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf,
    tensor_parallel_size: TensorParallel = 1, dry_run: DryRun = False,
    method: MethodOpt = Method.score, normalize: NormalizeOpt = Normalize.none, calibrate: CalibrateFlag = False,
    calibration: Calibration = None, ensemble: Ensemble = 1, probe_data: ProbeData = None,
    probe_size: ProbeSize = ProbeConfig.size, probe_layers: ProbeLayers = None, shots: Shots = None, shot_selection: ShotSelection = None, seed: ShotSeed = None, shot_format: ShotFormatOpt = None,
    overflow: OverflowOpt = Overflow.drop_shots, examples: Examples = None, prompts_dir: PromptsDir = None,
    var: Vars = None,
    input: InputFile = None, input_format: InputFormatOpt = InputFormat.auto, offset: Offset = 0, limit: Limit = None,
    output: OutputFile = None, format: OutputFormatOpt = OutputFormat.auto, batch_size: BatchSize = "16",
    resume: Resume = False, no_log: NoLog = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Pick a label for each input by scoring every label's text after the prompt.

    On a terminal: a table (gold label, a mark and the accuracy when inputs are labeled); else JSONL/CSV.
    """
    from llmlab.io import render
    from llmlab.orchestration import session
    from llmlab.core.config import ClassifyConfig, InputConfig, OutputConfig, batch_size as parse_batch

    console.configure(quiet, verbose)
    model_cfg = _model(model, device, dtype, chat, device_map, max_memory, backend, tensor_parallel_size)
    if dry_run:
        _dry_run(model_cfg)
    cfg = ClassifyConfig(
        model=model_cfg,
        prompt=_prompt(template, shots, shot_selection, seed, shot_format, overflow, examples, prompts_dir, var),
        input=InputConfig(input, value(input_format), "text", offset, limit),
        output=OutputConfig(output, value(format), resume),
        text=text, method=value(method), normalize=value(normalize),
        calibrate="contextual" if calibrate else calibration, ensemble=ensemble,
        batch_size=parse_batch(batch_size), probe=ProbeConfig(probe_data, probe_size, probe_layers),
    )
    table = cfg.output.terminal and console.stdout_is_terminal()
    done = session.classify(cfg, hooks(no_log), table=table)
    if done is not None:
        results, classifier = done
        tmpl = classifier.template
        render.classifications(results, classifier.labels, tmpl.fields[0], tmpl.target)


from llmlab.commands import eval_cmd as cli_eval  # noqa: E402,F401 - registers `eval` on app (after classify, for --help's order)
from llmlab.commands import prompt_cmd as cli_prompt  # noqa: E402,F401 - registers `prompt` and `models` on app
from llmlab.commands import runs_cmd as runs_cli  # noqa: E402  (runs, compare, report)
from llmlab.commands import optimize_cmd  # noqa: E402,F401 - registers `optimize`

from llmlab.commands import learn_cmd as learn_cli  # noqa: E402  (tokenize, info, next, lab)

runs_cli.register(app)
learn_cli.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
