"""`llmlab compare`: several templates, models or settings presets over the same inputs, side by side.
Imports only typer and the standard library at module level (`llmlab --help` stays instant)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmlab.commands.tables import check_choice, show_matrix
from llmlab.core import console
from llmlab.core.config import Backend, Dtype, value
from llmlab.core.errors import UsageError
from llmlab.commands.app import model_config
from llmlab.commands.options import (AdapterOpt, BackendOpt, Chat, Device, DeviceMapOpt, DtypeOpt, MaxMemoryOpt, MaxNewTokens, NoLog,
                                     PromptsDir, Quiet)

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.io.items import Item
    from llmlab.orchestration.compare import CompareOptions, Matrix, Variant
    from llmlab.prompting.templates import Template

PANEL = "Variants (every template x model x preset)"
CompareShots = Annotated[Optional[int], typer.Option("--shots", min=0, show_default="each template's shots:, else 0",
                                                     help="Demonstrations in each templated prompt.")]
CalibrateFlag = Annotated[bool, typer.Option("--calibrate", help="Classify templates: same as --calibration contextual.")]
CalibrationOpt = Annotated[Optional[str], typer.Option("--calibration", show_default="each template's calibrate:, else off",
                                                       help="Classify templates: off, contextual, batch, domain or "
                                                       "probe.")]


def compare_cmd(
    input: Annotated[str, typer.Option("--input", "-i", help="The inputs every variant runs on: JSONL or CSV (- = stdin).")],
    template: Annotated[Optional[list[str]], typer.Option("--template", "-t", rich_help_panel=PANEL,
                                                          help="A template to compare (repeatable).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", rich_help_panel=PANEL,
                                                       help="A model to compare (repeatable). [default: smollm2]")] = None,
    config: Annotated[Optional[list[Path]], typer.Option("--config", rich_help_panel=PANEL,
                                                         help="A YAML generation preset to compare (repeatable).")] = None,
    shots: CompareShots = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the shot draw and sampling.")] = None,
    method: Annotated[str, typer.Option(help="Classify templates: score or generate.")] = "score",
    calibrate: CalibrateFlag = False,
    calibration: CalibrationOpt = None,
    field: Annotated[str, typer.Option(help="Without --template: the input field holding the prompt.")] = "prompt",
    reference: Annotated[Optional[str], typer.Option(help="Without --template: the field with the reference output (ROUGE-L).")] = None,
    max_new_tokens: MaxNewTokens = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N inputs.")] = None,
    show: Annotated[str, typer.Option(help="Rows to show: all, differing, wrong.")] = "all",
    baseline: Annotated[Optional[str], typer.Option(help="The variant (its column's label) the others are compared "
                                                    "with: paired differences, 95% CI, Holm p.",
                                                    show_default="the first")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="auto (a table on a terminal, else JSONL), jsonl, csv.")] = "auto",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the matrix here (.jsonl or .csv).")] = None,
    html: Annotated[Optional[str], typer.Option("--html", help="Also write the matrix as a self-contained HTML page.")] = None,
    device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None, device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None, backend: BackendOpt = Backend.hf, adapter: AdapterOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per forward pass.")] = 8,
    prompts_dir: PromptsDir = None, no_log: NoLog = False, quiet: Quiet = False,
) -> None:
    """Templates, models or settings presets side by side over the same inputs.

    A matrix: a row per input, a column per variant (output, or prediction with a ✓/✗ mark), and each column's
    accuracy or ROUGE-L. Each variant is logged as a run."""
    from llmlab.orchestration import compare, resolve
    from llmlab.prompting import prompts

    console.configure(quiet, False)
    check_choice("--show", show, ("all", "differing", "wrong"))
    check_choice("--format", format, ("auto", "jsonl", "csv"))
    _check_folders(output, html)
    model_cfg = model_config(None, device, dtype, chat, device_map, max_memory, backend)
    templates = [prompts.find_template(t, prompts_dir or []) for t in template or []]
    chosen = compare.variants(templates, _with_adapter(model or [], adapter, backend), config or [])
    compare.check_baseline(chosen, baseline)
    flag = resolve.calibration_flag(calibration, calibrate)
    # Each template's calibration, and the probe's rows where it is probe, read before any model time.
    probes = {t.name: compare.probe_for(t, flag, method) for t in templates}
    items = _items(input, field, limit, templates)
    opts: CompareOptions = {"input": input, "shots": shots, "seed": seed, "method": method, "calibration": flag,
            "field": field, "reference": reference, "device": device, "dtype": value(dtype), "chat": value(chat),
            "batch_size": batch_size, "generation": {"max_new_tokens": max_new_tokens, "seed": seed},
            "model": model_cfg, "probes": probes}
    m = _run(chosen, items, opts, input, no_log)
    if html:
        from llmlab.io.safewrite import write_text
        from llmlab.orchestration import report

        write_text(html, report.render([], m, title=f"llmlab compare on {input}"))  # whole, or the old one stays
        console.note(f"wrote {html}")
    show_matrix(m, compare.select(m, show), format, output, compare.paired(m, compare.baseline_column(m, baseline)))


def _run(chosen: list[Variant], items: list[Item], opts: CompareOptions, input: str, no_log: bool) -> Matrix:
    """Every variant over the items, each logged as a run; the matrix."""
    from llmlab.orchestration import compare
    from llmlab.runs import runlog

    if runlog.enabled(no_log):
        runlog.connect().close()  # a log that can't be opened fails now, not after the first variant

    open_run = functools.partial(runlog.open_run, no_log=no_log, data=input, on_warn=console.warn)

    with console.progress(len(items) * len(chosen), "comparing") as bar:
        return compare.run_compare(chosen, items, opts, open_run, bar, on_warn=console.warn)


def _with_adapter(models: list[str], adapter: Optional[str], backend: Backend) -> list[str]:
    """--adapter DIR: the -m models (smollm2 when none) and BASE+DIR beside them, BASE the first."""
    if not adapter:
        return models
    from llmlab.backends import adapters
    from llmlab.backends.modelspec import DEFAULT_MODEL

    adapters.read_record(adapter)
    if value(backend) == "vllm":
        raise UsageError("--adapter runs on --backend hf; vLLM loads the base model only")
    return (models or [DEFAULT_MODEL]) + [adapters.join(models[0] if models else None, adapter) or ""]


def _check_folders(*paths: Optional[str]) -> None:
    """Each output file's folder exists (checked before any model time)."""
    for path in [p for p in paths if p]:
        if not Path(path).parent.is_dir():
            raise UsageError(f"folder of '{path}' does not exist; create it or write elsewhere")


def _items(path: str, field: str, limit: Optional[int], templates: list[Template]) -> list[Item]:
    """The inputs every variant runs on, checked against each template (or the prompt field)."""
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    items = io.read_items(path, "auto", text_field=field)[:limit]
    io.check_unique_ids(items)
    for t in templates:
        prompts.require_fields(items, t)
    if not templates:
        io.require_field(items, field)
    return items


def register(app: typer.Typer) -> None:
    """Add compare to the llmlab app."""
    app.command("compare")(compare_cmd)
