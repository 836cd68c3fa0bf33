"""`llmlab tune`: train a PEFT adapter (LoRA, IA3, prompt tuning) on k labelled rows in a template's
prompt format; the folder it writes is then a model: --adapter DIR or -m BASE+DIR on any command."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from llmlab.commands.app import hooks, model_config
from llmlab.commands.options import (IO_PANEL, PROMPT_PANEL, Chat, Device, DtypeOpt, Model, NoLog, PromptsDir,
                                     Quiet, Verbose)
from llmlab.core import console
from llmlab.core.config import Dtype, InputFormat, TuneConfig, TuneMethod, value
from llmlab.commands.options import InputFormatOpt

TRAIN_PANEL = "Training"

Template = Annotated[str, typer.Option("--template", "-t", rich_help_panel=PROMPT_PANEL, show_default=False,
                                       help="The template whose prompts the adapter learns (classify: its labels; "
                                       "generate: its target text). [required]")]
Data = Annotated[str, typer.Option("--data", rich_help_panel=IO_PANEL, show_default=False,
                                   help="Labelled rows (JSONL/CSV) with the template's fields. [required]")]
Output = Annotated[str, typer.Option("--output", "-o", rich_help_panel=IO_PANEL, show_default=False,
                                     help="The adapter folder to write (must not exist). [required]")]
MethodOpt = Annotated[TuneMethod, typer.Option("--method", rich_help_panel=TRAIN_PANEL,
                                               help="lora: low-rank updates of the attention and MLP weights; ia3: "
                                               "learned scales of keys, values and MLP (T-Few); prompt: learned "
                                               "virtual tokens before the prompt (decoder-only).")]
K = Annotated[int, typer.Option("--k", rich_help_panel=TRAIN_PANEL,
                                help="Labelled rows to use, drawn like demonstrations (balanced by label for "
                                "classify templates, seeded); the held-out slice comes out of them.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=TRAIN_PANEL,
                                   help="Seed of the draw, the held-out split, the initial weights and the batches.")]
Steps = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="Optimizer steps at most.")]
BatchSize = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="Rows per step.")]
Lr = Annotated[Optional[float], typer.Option("--lr", rich_help_panel=TRAIN_PANEL,
                                             show_default="lora 1e-3, ia3 3e-3, prompt 3e-2",
                                             help="AdamW learning rate.")]
Rank = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="LoRA rank.")]
Alpha = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="LoRA alpha (the update is scaled by alpha/rank).")]
Virtual = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="Prompt tuning: virtual tokens learned.")]
HeldOut = Annotated[float, typer.Option(rich_help_panel=TRAIN_PANEL,
                                        help="Share of the k rows held out to pick the best step (none below 4 rows).")]
EvalEvery = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL, help="Steps between held-out checks.")]
Patience = Annotated[int, typer.Option(rich_help_panel=TRAIN_PANEL,
                                       help="Held-out checks without a better step before stopping early.")]
Target = Annotated[Optional[str], typer.Option(rich_help_panel=PROMPT_PANEL, show_default="the template's target",
                                               help="Generate templates: the field holding the text to learn.")]
Shots = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL,
                                    help="Demonstrations in the training prompts (runs of the adapter use the same "
                                    "unless --shots is given there).")]


def tune(
    template: Template, data: Data, output: Output, method: MethodOpt = TuneMethod.lora,
    k: K = 64, seed: Seed = 0, steps: Steps = 100, batch_size: BatchSize = 8, lr: Lr = None, rank: Rank = 8,
    alpha: Alpha = 16, virtual_tokens: Virtual = 20, held_out: HeldOut = 0.2, eval_every: EvalEvery = 25,
    patience: Patience = 5, target: Target = None, shots: Shots = 0,
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    input_format: InputFormatOpt = InputFormat.auto, prompts_dir: PromptsDir = None,
    no_log: NoLog = False, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Fine-tune an adapter on k labelled rows; the folder then works as a model (--adapter DIR).

    The record of the training (base, template, data hash, k, seed, settings, trainable parameters,
    time, best held-out step) is printed as JSON and kept in the folder, and logged as a run.
    """
    from llmlab.tuning import plan, train

    console.configure(quiet, verbose)
    plan.check_base_spec(model)
    cfg = TuneConfig(model_config(model, device, dtype, chat), template, data, output, value(method), k, seed, steps,
                     batch_size, lr, rank, alpha, virtual_tokens, held_out, eval_every, patience, target, shots,
                     list(prompts_dir or []), value(input_format))
    record = train.tune(cfg, hooks(no_log))
    print(json.dumps(record))


def register(app: typer.Typer) -> None:
    """Add tune to the llmlab app."""
    app.command("tune")(tune)
