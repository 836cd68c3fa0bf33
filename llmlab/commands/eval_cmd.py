"""`llmlab eval`: every template x shot count x seed x calibration on labeled data, one table."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from llmlab.core import console
from llmlab.commands.app import command_line, hooks, show_placement, model_config, prompt_config
from llmlab.core.config import Backend, Dtype, InputFormat, Method, Normalize, Overflow, ProbeConfig, value
from llmlab.commands.options import (CLASSIFY_PANEL, IO_PANEL, MODEL_PANEL, PROMPT_PANEL, BackendOpt, BatchSize, Chat, Device,
                            DeviceMapOpt, DryRun, DtypeOpt, Ensemble, Examples, InputFormatOpt, Limit, MaxMemoryOpt,
                            MaxNewTokens, MethodOpt, Model, NoLog, NormalizeOpt, Offset, OverflowOpt, PromptsDir,
                            ProbeData, ProbeLayers, ProbeSize, Quiet, Server, ShotFormatOpt, ShotSelection,
                            TensorParallel, Verbose)


# eval's own options (the shared ones are in options.py)
Templates = Annotated[Optional[list[str]], typer.Option(
    "--template", "-t", rich_help_panel=PROMPT_PANEL, show_default="none",
    help="Template to evaluate (repeatable): NAME (on --data) or NAME=DATA (on its own data file).")]
Data = Annotated[Optional[str], typer.Option(rich_help_panel=IO_PANEL, show_default="none",
                                             help="Labeled data for templates given without =DATA: JSONL or CSV "
                                             "(- = stdin).")]
PlanFile = Annotated[Optional[str], typer.Option("--plan", rich_help_panel=IO_PANEL, show_default="none",
                                                 help="YAML file listing tasks: {template: NAME, data: FILE} each "
                                                 "(added to any -t).")]
ShotList = Annotated[Optional[str], typer.Option("--shots", rich_help_panel=PROMPT_PANEL,
                                                 show_default="each template's shots:, else 0",
                                                 help="Shot counts to compare, e.g. 0,1,4,8.")]
Seeds = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL,
                                    help="Demonstration draws per shot count (seeds 0..N-1); mean ± std and "
                                    "min–max over them.")]
Calibrations = Annotated[Optional[str], typer.Option("--calibration", rich_help_panel=CLASSIFY_PANEL,
                                                     show_default="each template's calibrate:, else off",
                                                     help="Calibration methods to compare, comma-separated: off, "
                                                     "contextual, batch, domain, probe (on = contextual, both = "
                                                     "off,contextual).")]
CalibrateOn = Annotated[bool, typer.Option("--calibrate", rich_help_panel=CLASSIFY_PANEL,
                                           help="Same as --calibration contextual.")]
Report = Annotated[Optional[str], typer.Option(rich_help_panel=IO_PANEL, show_default="none",
                                               help="Write the whole result as JSON: config, model, template text, "
                                               "metrics per seed, versions.")]
Detail = Annotated[bool, typer.Option("--detail", rich_help_panel=IO_PANEL,
                                      help="Under the table: each combination's min–max over seeds, per-label "
                                      "precision/recall and confusion (all are in --report too).")]
LogSamples = Annotated[bool, typer.Option(rich_help_panel=IO_PANEL, help="Put per-item predictions in the report.")]
References = Annotated[Optional[list[str]], typer.Option("--reference", rich_help_panel=IO_PANEL,
                                                         show_default="the template's",
                                                         help="Reference field(s) for generate templates "
                                                         "(repeatable).")]
SampleSize = Annotated[Optional[int], typer.Option("--sample", rich_help_panel=IO_PANEL, show_default="all rows",
                                                  help="Evaluate a fixed seeded sample of N rows (the rows shuffled "
                                                  "with --sample-seed, the first N kept; before --offset/--limit).")]
SampleSeed = Annotated[int, typer.Option(rich_help_panel=IO_PANEL, help="Seed of --sample's shuffle.")]
AdapterList = Annotated[Optional[str], typer.Option("--adapter", rich_help_panel=MODEL_PANEL, show_default="none",
                                                   help="Adapter folders from `llmlab tune`, comma-separated: a row "
                                                   "per adapter (on -m, with the prompts it was trained on) beside "
                                                   "the in-context rows, with k, training time, trainable "
                                                   "parameters, size, prompt tokens and FLOPs per item.")]
Processes = Annotated[str, typer.Option(rich_help_panel=MODEL_PANEL,
                                        help="Split the items over N processes (torchrun; one per GPU, or CPU "
                                        "processes over gloo); same results as 1. auto: as many as the items, "
                                        "GPUs or cores and memory allow (N is capped the same way). Or run under "
                                        "`accelerate launch --multi_gpu -m llmlab eval`.")]


def eval_cmd(
    template: Templates = None, data: Data = None, plan: PlanFile = None, shots: ShotList = None, seeds: Seeds = 1,
    calibration: Calibrations = None, calibrate: CalibrateOn = False, offset: Offset = 0, limit: Limit = None,
    sample: SampleSize = None, sample_seed: SampleSeed = 0,
    report: Report = None, detail: Detail = False, log_samples: LogSamples = False, reference: References = None,
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf,
    tensor_parallel_size: TensorParallel = 1, dry_run: DryRun = False, adapter: AdapterList = None,
    method: MethodOpt = Method.score, normalize: NormalizeOpt = Normalize.none, ensemble: Ensemble = 1,
    probe_data: ProbeData = None, probe_size: ProbeSize = ProbeConfig.size, probe_layers: ProbeLayers = None,
    shot_selection: ShotSelection = None, shot_format: ShotFormatOpt = None,
    overflow: OverflowOpt = Overflow.drop_shots, examples: Examples = None, prompts_dir: PromptsDir = None,
    max_new_tokens: MaxNewTokens = None, batch_size: BatchSize = "16", input_format: InputFormatOpt = InputFormat.auto,
    no_log: NoLog = False, processes: Processes = "1", server: Server = None, quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Measure prompt files on labeled data: every template x shot count x seed x calibration, one table.

    Each template can have its own data: llmlab eval -t sentiment=sst2.jsonl -t news-topic=ag_news.jsonl
    """
    from llmlab.core.config import EvalConfig, batch_size as parse_batch
    from llmlab.io import render
    from llmlab.orchestration import evaluate, parallel, resolve

    console.configure(quiet, verbose)
    if server:
        from llmlab.serving import client

        client.refuse({"--adapter": adapter, "--processes": processes != "1", "--examples": examples,
                       "--prompts-dir": prompts_dir, "--probe-data": probe_data, "--dry-run": dry_run},
                      [t.partition("=")[0] for t in template or []])
    model_cfg = model_config(model, device, dtype, chat, device_map, max_memory, backend, tensor_parallel_size)
    if dry_run:
        show_placement(model_cfg)
    cfg = EvalConfig(
        list(template or []), data, plan, shots, seeds, resolve.calibration_flag(calibration, calibrate),
        value(method), value(normalize), ensemble, ProbeConfig(probe_data, probe_size, probe_layers),
        prompt_config(None, None, shot_selection, None, shot_format, overflow, examples, prompts_dir),
        value(input_format), offset, limit, sample, sample_seed, list(reference or []), max_new_tokens,
        parse_batch(batch_size), report, log_samples, adapter)
    the_plan = evaluate.make_plan(cfg)
    tasks = the_plan.tasks
    if server:
        result = client.evaluate(the_plan, model_cfg, hooks(no_log), server)
    else:
        _in_processes(processes, [t.data for t in tasks], model_cfg, max(len(t.items) for t in tasks))
        # Only process 0 keeps the run log (it logs every process's items once they are gathered).
        result = evaluate.run(the_plan, model_cfg, hooks(no_log or not parallel.is_main()))
    if not parallel.is_main():
        return
    result["processes"] = parallel.size()
    render.eval_table(result, detail)  # the table first: a report that can't be written loses nothing
    if result["paired"]:
        from llmlab.orchestration import paired

        render.show(paired.HEADERS, paired.rows(result), title="Paired differences against the first row on the "
                    "same data (95% bootstrap CI; p Holm-corrected over these rows)")
    if report:
        evaluate.write_report(report, result)


def _gpus(model_cfg) -> int:
    """GPUs the processes would use (one each); 0 on a CPU run. Imports torch only for a CUDA device."""
    if model_cfg.device not in ("auto",) and not str(model_cfg.device).startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _in_processes(asked: str, data: list, model_cfg, items: int) -> None:
    """--processes N > 1: everything is checked, so re-run this command in N processes and exit
    with their status (llmlab.orchestration.parallel). Inside one of them: join the group; only process 0 talks."""
    from llmlab.orchestration import parallel

    processes = parallel.parse_processes(asked)
    if processes != 1:
        from llmlab.backends import adapters
        from llmlab.backends.modelspec import resolve_model, weights_bytes

        base = adapters.split(model_cfg.spec)[0]
        resolve_model(base)  # a model that isn't there: one line here, not one per process
        processes, why = parallel.plan(processes, items, weights_bytes(base), gpus=_gpus(model_cfg),
                                       memory=parallel.available_memory())
        if why:
            console.warn(why)
    parallel.check(processes, data, model_cfg.device_map)
    if processes > 1:
        raise typer.Exit(parallel.launch(command_line(), processes, sys.stderr.write,
                                         os.environ.get("LLMLAB_DEBUG", "") not in ("", "0")))
    parallel.init()
    if not parallel.is_main():
        console.configure(True, False)  # one progress bar and one set of messages: process 0's


def register(app: typer.Typer) -> None:
    """Add eval to the llmlab app."""
    app.command("eval")(eval_cmd)
