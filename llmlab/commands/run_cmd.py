"""`llmlab generate` and `llmlab classify`: one prompt or a batch of inputs, through one library call each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional, Protocol, Sequence

import typer

from llmlab.commands.app import hooks, show_placement, model_config, prompt_config
from llmlab.commands.options import *  # noqa: F403 - the shared option declarations
from llmlab.core import console
from llmlab.core.config import (Backend, Dtype, GenEngine, InputFormat, Method, Normalize, OutputFormat, Overflow,
                                ProbeConfig, value)

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.prompting.templates import Template


class Labelled(Protocol):
    """What classify's table reads of the classifier (scoring.classify.Classifier, serving.client.Labels)."""

    @property
    def template(self) -> Template: ...
    @property
    def labels(self) -> Sequence[str]: ...


# ---------------------------------------------------------------- generate


PromptArg = Annotated[Optional[str], typer.Argument(help="The prompt. Omit it to read stdin or use --input.",
                                                   show_default=False)]
PromptField = Annotated[str, typer.Option("--field", rich_help_panel=IO_PANEL, help="Input field holding the prompt.")]
Echo = Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Print the prompt before the completion.")]


def generate(
    prompt: PromptArg = None,
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf,
    tensor_parallel_size: TensorParallel = 1, dry_run: DryRun = False, adapter: AdapterOpt = None,
    server: Server = None,
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
    model_cfg = model_config(model, device, dtype, chat, device_map, max_memory, backend, tensor_parallel_size,
                             adapter)
    if dry_run:
        show_placement(model_cfg)
    flags = dict(max_new_tokens=max_new_tokens, do_sample=None if greedy is None else not greedy,
                 temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                 num_beams=num_beams, num_return_sequences=num_return_sequences, seed=seed, stop=stop or None,
                 logprobs=logprobs, top_logprobs=top_logprobs)
    cfg = GenerateConfig(
        model=model_cfg,
        prompt=prompt_config(template, shots, shot_selection, seed, shot_format, overflow, examples, prompts_dir, var),
        input=InputConfig(input, value(input_format), field, offset, limit),
        output=OutputConfig(output, value(format), resume),
        flags=flags, preset=config, text=prompt, batch_size=parse_batch(batch_size), echo=echo,
        gen_engine=value(gen_engine),
    )
    if server:
        from llmlab.serving import client

        return client.generate(cfg, hooks(no_log), server, display=console.stdout_is_terminal())
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
                                                    metavar="[off|contextual|batch|domain|probe]",
                                                    show_default="the template's calibrate:, else off",
                                                    help="Calibration method: off, contextual (Zhao et al. 2021), "
                                                    "batch (Zhou et al. 2024: the bias is the mean over the "
                                                    "inputs), domain (Fei et al. 2023: random in-domain words), "
                                                    "probe (a probe on the hidden states, fit on --probe-data).")]


def classify(
    # `...` is typer's mark of a required option (it must follow `text`, which has a default): not a str
    text: TextArg = None, template: ClassifyTemplate = ...,  # type: ignore[assignment]
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf,
    tensor_parallel_size: TensorParallel = 1, dry_run: DryRun = False, adapter: AdapterOpt = None,
    server: Server = None,
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
    from llmlab.orchestration import resolve, session
    from llmlab.core.config import ClassifyConfig, InputConfig, OutputConfig, batch_size as parse_batch

    console.configure(quiet, verbose)
    model_cfg = model_config(model, device, dtype, chat, device_map, max_memory, backend, tensor_parallel_size,
                             adapter)
    if dry_run:
        show_placement(model_cfg)
    cfg = ClassifyConfig(
        model=model_cfg,
        prompt=prompt_config(template, shots, shot_selection, seed, shot_format, overflow, examples, prompts_dir, var),
        input=InputConfig(input, value(input_format), "text", offset, limit),
        output=OutputConfig(output, value(format), resume),
        text=text, method=value(method), normalize=value(normalize),
        calibrate=resolve.calibration_flag(calibration, calibrate), ensemble=ensemble,
        batch_size=parse_batch(batch_size), probe=ProbeConfig(probe_data, probe_size, probe_layers),
    )
    table = cfg.output.terminal and console.stdout_is_terminal()
    done: Optional[tuple[Sequence[render.Classified], Labelled]]
    if server:
        from llmlab.serving import client

        done = client.classify(cfg, hooks(no_log), server, table=table)
    else:
        done = session.classify(cfg, hooks(no_log), table=table)
    if done is not None:
        results, classifier = done
        tmpl = classifier.template
        if table:
            render.classifications(results, classifier.labels, tmpl.fields[0], tmpl.target)
        elif cfg.output.path:  # a closing line on a terminal (or with -v): what was written where
            from llmlab.scoring.classify import run_metrics

            console.info(render.classify_summary(run_metrics(results, tmpl), cfg.output.path))


def register(app: typer.Typer) -> None:
    """Add generate and classify to the llmlab app."""
    app.command("generate")(generate)
    app.command("classify")(classify)
