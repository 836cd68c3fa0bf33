"""What `llmlab tune` will train on, decided and checked before any model time: the template, the
k rows (drawn by the same rule as demonstrations: llmlab.prompting.prompts.select_shots, balanced
by label for classify templates, seeded), the held-out slice that picks the best step, the output
folder. Every mistake is one line."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.core.config import TuneConfig
from llmlab.core.errors import DataError, ModelError, UsageError

if TYPE_CHECKING:
    from llmlab.io.items import Item
    from llmlab.prompting.templates import Template

METHODS = ("lora", "ia3", "prompt")


@dataclass
class TunePlan:
    template: Template
    target: str  # the field holding the label (classify) or the text to learn (generate)
    train: list[Item]
    held_out: list[Item]
    data_sha256: str


def _check_numbers(cfg: TuneConfig) -> None:
    if cfg.method not in METHODS:
        raise UsageError(f"invalid --method '{cfg.method}': choose lora, ia3 or prompt")
    for name, number, low in (("--k", cfg.k, 1), ("--steps", cfg.steps, 1), ("--batch-size", cfg.batch_size, 1),
                              ("--rank", cfg.rank, 1), ("--virtual-tokens", cfg.virtual_tokens, 1),
                              ("--eval-every", cfg.eval_every, 1), ("--patience", cfg.patience, 1),
                              ("--shots", cfg.shots, 0)):
        if number < low:
            raise UsageError(f"invalid {name} {number}: must be >= {low}")
    if not 0 <= cfg.held_out < 1:
        raise UsageError(f"invalid --held-out {cfg.held_out}: give a share in [0, 1), e.g. 0.2")
    if cfg.lr is not None and cfg.lr <= 0:
        raise UsageError(f"invalid --lr {cfg.lr}: must be > 0")


def _check_output(folder: str) -> None:
    path = Path(folder)
    if path.exists():
        raise DataError(f"-o '{folder}' already exists; choose a new folder (an adapter is never overwritten)")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise DataError(f"-o '{folder}': '{parent}' is not a folder; choose another place")


def check_base_spec(spec: str | None) -> None:
    from llmlab.backends import adapters

    if adapters.split(spec)[1] is not None:
        raise UsageError(f"-m '{spec}' names an adapter; tune trains a new one on a base model: "
                         "give the base alone")


def _check_model(cfg: TuneConfig) -> None:
    check_base_spec(cfg.model.spec)
    if cfg.model.backend != "hf":
        raise UsageError("llmlab tune trains with --backend hf")


def _check_fields(items: list[Item], template: Template, target: str, data: str) -> None:
    missing = [f for f in [*template.fields, target] if f not in items[0].fields]
    if missing:
        raise DataError(f"{data}: rows have no '{missing[0]}' field, which template '{template.name}' needs"
                        + (" (give the field to learn with --target FIELD)" if missing[0] == target else ""))
    if template.task == "classify":
        unknown = sorted({str(i.fields[target]) for i in items} - set(template.labels))
        if unknown:
            raise DataError(f"{data}: label '{unknown[0]}' is not one of template '{template.name}''s labels "
                            f"({', '.join(template.labels)})")


def draw(items: list[Item], template: Template, k: int, seed: int) -> list[Item]:
    """k rows, chosen as k demonstrations would be: balanced round-robin over the labels for a
    classify template (random order within each label), a seeded random sample otherwise."""
    from llmlab.prompting.prompts import select_shots

    selection = "balanced" if template.task == "classify" else "random"
    pool = [i.fields for i in items]
    return [items[n] for n in select_shots(template, pool, k, selection, seed)]


def split(rows: list[Item], share: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, held out): a seeded share of the rows held out (none when fewer than 4 rows, so a
    tiny k still trains); the held-out rows are a shuffle's first ceil(share x k)."""
    count = min(math.ceil(share * len(rows)), len(rows) - 1) if len(rows) >= 4 else 0
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:count])
    return [r for n, r in enumerate(rows) if n not in held], [r for n, r in enumerate(rows) if n in held]


def prepare(cfg: TuneConfig) -> TunePlan:
    """Check everything that needs no model, read the data and draw the rows."""
    from llmlab.core.config import check_prompts_dirs
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    from llmlab.backends.adapters import require_peft

    require_peft()
    _check_numbers(cfg)
    _check_model(cfg)
    check_prompts_dirs(cfg.prompts_dir)
    template = prompts.find_template(cfg.template, cfg.prompts_dir)
    target = cfg.target or template.target
    if not target:  # a classify template always names one
        raise UsageError(f"template '{template.name}' has no target field: give the field holding the text to "
                         "learn with --target FIELD")
    if not Path(cfg.data).is_file():
        raise DataError(f"--data '{cfg.data}' not found; give a JSONL or CSV file of labelled rows")
    _check_output(cfg.output)
    items = io.read_items(cfg.data, cfg.input_format, text_field=template.fields[0])
    _check_fields(items, template, target, cfg.data)
    if cfg.k > len(items):
        raise UsageError(f"--k {cfg.k}: {cfg.data} has only {len(items)} rows; use --k {len(items)} or less")
    if cfg.shots and not template.examples:
        raise UsageError(f"--shots {cfg.shots}: template '{template.name}' has no examples to show")
    rows = draw(items, template, cfg.k, cfg.seed)
    train, held = split(rows, cfg.held_out, cfg.seed)
    return TunePlan(template, target, train, held, sha256(cfg.data))


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_prompt_tuning(method: str, encoder_decoder: bool) -> None:
    if method == "prompt" and encoder_decoder:
        raise ModelError("--method prompt runs on decoder-only models here; use lora or ia3 for an "
                         "encoder-decoder model")
