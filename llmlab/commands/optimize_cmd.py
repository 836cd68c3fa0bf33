"""`llmlab optimize`: search a template's prompt on part of the data; the held-out table on stdout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmlab.commands.app import hooks, model_config
from llmlab.commands.options import (IO_PANEL, PROMPT_PANEL, BatchSize, Device, DtypeOpt, Examples, Limit, Model,
                                     NoLog, Offset, PromptsDir, Quiet, Verbose)
from llmlab.core import console
from llmlab.core.config import Dtype

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.optimizing.optimize import Result

OptTemplate = Annotated[str, typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL, show_default=False,
                                          help="The start template: name or .yaml path. [required]")]
OptData = Annotated[str, typer.Option("--data", rich_help_panel=IO_PANEL, show_default=False,
                                      help="Labeled rows (JSONL/CSV): searched on, and held out unless --test. "
                                      "[required]")]
OptTest = Annotated[Optional[str], typer.Option("--test", rich_help_panel=IO_PANEL, show_default="a share of --data",
                                                help="Held-out rows, scored once at the end.")]
Holdout = Annotated[float, typer.Option(rich_help_panel=IO_PANEL,
                                        help="Share of --data held out (without --test), drawn with --seed.")]
Budget = Annotated[str, typer.Option(rich_help_panel=PROMPT_PANEL, show_default=False,
                                     help="Scored items the search may spend (variant x row; probe rows fitted "
                                     "count too), e.g. 2000, or its time, e.g. 20m. [required]")]
OptSeed = Annotated[int, typer.Option("--seed", rich_help_panel=PROMPT_PANEL,
                                      help="Seed of the split, the row order and the variants drawn.")]
Candidates = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL, help="Variants in the first round.")]
Proposals = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL,
                                        help="Instructions the loaded model writes from a few examples.")]
ProbeRows = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL,
                                        help="Search rows set aside to fit a probe on (a readout the search tries; "
                                        "the winner's probe rows are written beside -o). 0: none.")]
Proposer = Annotated[Optional[str], typer.Option(rich_help_panel=PROMPT_PANEL, show_default="the searched model",
                                                help="A model (name or folder) that writes the proposed instructions.")]
OptOutput = Annotated[str, typer.Option("--output", "-o", rich_help_panel=IO_PANEL, show_default=False,
                                        help="Where to write the winning template (.yaml). [required]")]


def optimize(
    template: OptTemplate, data: OptData, budget: Budget, output: OptOutput,
    test: OptTest = None, holdout: Holdout = 0.5, seed: OptSeed = 0, candidates: Candidates = 16,
    proposals: Proposals = 2, proposer: Proposer = None, probe_rows: ProbeRows = 0, offset: Offset = 0, limit: Limit = None, examples: Examples = None,
    prompts_dir: PromptsDir = None, model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto,
    batch_size: BatchSize = "16", no_log: NoLog = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Search a template's instruction, label words, demonstrations, format and calibration on part of
    the data (successive halving within --budget), then compare start and winner once on held-out rows.

    Prints the held-out difference with its 95% paired bootstrap interval and McNemar's p (ROUGE-L: permutation).
    """
    from llmlab.core.config import OptimizeConfig, batch_size as parse_batch
    from llmlab.optimizing import budget as budgets
    from llmlab.optimizing import optimize as optimizing

    console.configure(quiet, verbose)
    items, seconds = budgets.parse(budget)
    cfg = OptimizeConfig(model_config(model, device, dtype, None), template, data, output, items, test, holdout, seed,
                         candidates, proposals, offset, limit, parse_batch(batch_size) or 16, examples,
                         list(prompts_dir or []), probe_rows, seconds,
                         model_config(proposer, device, dtype, None) if proposer else None)
    table(optimizing.optimize(cfg, hooks(no_log)))


def table(r: Result) -> None:
    """The held-out comparison on stdout; what was searched on stderr."""
    from llmlab.io import render

    d = r.difference
    shown = (lambda x: f"{x:.1%}") if r.task == "classify" else (lambda x: f"{x:.4f}")
    rows = [["start", r.template, shown(d.a), f"{shown(r.start_search[0])} ({r.start_search[1]})"],
            ["optimised", r.output, shown(d.b), f"{shown(r.winner_search[0])} ({r.winner_search[1]})"]]
    test = "McNemar exact" if d.test == "mcnemar" else "paired permutation"
    footer = (f"difference {d.diff * 100:+.1f} points, 95% paired bootstrap CI [{d.low * 100:+.1f}, "
              f"{d.high * 100:+.1f}], {test} p = {d.p:.3g}: {d.verdict()}")
    render.show(["", "template", f"held-out {r.metric}", "search (rows)"], rows,
                title=f"{r.held_rows} held-out rows, scored once", footer=footer)
    from llmlab.optimizing import budget as budgets

    console.info(f"searched {r.candidates} variants on up to {r.search_rows} rows: {r.spent} scored items in "
                 f"{r.search_seconds:.0f}s (budget {budgets.shown(r.budget, r.budget_seconds)}), {r.seconds:.0f}s in all; "
                 f"winner: {r.winner}")


def register(app: typer.Typer) -> None:
    """Add optimize to the llmlab app."""
    app.command("optimize")(optimize)
