"""Adapters (`llmlab tune`'s folders) inside the library entry points: the prompts an adapter was
trained on become the defaults of the commands that run it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Protocol

from llmlab.core.config import ModelConfig, PromptConfig
from llmlab.io.evalreport import Cost, Result, Versus

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.adapters import Record
    from llmlab.backends.base import LM
    from llmlab.prompting.templates import Template


class Warns(Protocol):
    """The session's hooks, as far as this module uses them (session.Hooks)."""

    @property
    def warn(self) -> Callable[[str], None]: ...


class Task(Protocol):
    """A template and its data (evalplan.EvalTask)."""

    @property
    def template(self) -> Template: ...
    @property
    def data(self) -> str: ...


def adapters_in(model: ModelConfig) -> bool:
    from llmlab.backends import adapters

    return adapters.split(model.spec)[1] is not None


def adapter_defaults(model: ModelConfig, prompt: PromptConfig, template: Template | None,
                     hooks: Warns) -> tuple[ModelConfig, PromptConfig]:
    """With an adapter, the prompts it was trained on: its shots and chat mode (unless --shots and
    --chat are given), and a word when the template is not the one it was trained with."""
    from llmlab.backends import adapters

    folder = adapters.split(model.spec)[1]
    if folder is None:
        return model, prompt
    record = adapters.read_record(folder)
    if template is not None and record.get("template") not in (None, template.name):
        hooks.warn(f"adapter '{folder}' was trained with template '{record.get('template')}', "
                   f"not '{template.name}'")
    if model.chat is None and record.get("chat") is not None:
        model = replace(model, chat="on" if record["chat"] else "off")
    return model, (replace(prompt, shots=record.get("shots", 0)) if prompt.shots is None else prompt)


# ---------------------------------------------------------------- llmlab eval --adapter a,b


def parse_adapters(text: str | None) -> list[str]:
    """--adapter a,b: the folders, each checked (one line for a missing one) before any model time."""
    from llmlab.backends import adapters

    folders = [f.strip() for f in (text or "").split(",") if f.strip()]
    for folder in folders:
        adapters.read_record(folder)
    return folders


def versus(result: Result, rows: list[Result], task: Task) -> Versus | None:
    """The adapter's accuracy minus the first in-context row's on the same items (that row's first
    seed), with a 95% paired bootstrap interval."""
    from llmlab.scoring.stats import bootstrap_ci

    base = next((r for r in rows if r["template"] == task.template.name and r["data"] == task.data
                 and r["task"] == "classify"), None)
    if base is None or "correct" not in result["runs"][0]["metrics"]:
        return None
    a, b = base["runs"][0]["metrics"]["correct"], result["runs"][0]["metrics"]["correct"]
    diff = (sum(b) - sum(a)) / len(a)
    low, high = bootstrap_ci(a, b)
    return {"baseline": f"{base['shots']} shots, calibration {base['calibrate']}, seed {base['seeds'][0]}",
            "diff": diff, "low": low, "high": high}


def _number(value: object) -> float | None:
    """A number of an adapter's settings (JSON values), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cost(result: Result, lm: LM, record: Record | None = None, folder: str | None = None,
         probe_rows: int = 0) -> Cost:
    """What a row cost: labelled rows used (k), training time, trainable parameters, adapter bytes,
    prompt tokens per item and inference FLOPs per item (2N per token the model reads, N its
    parameters; prompt tuning's virtual tokens count as read)."""
    from llmlab.backends import adapters

    per_run = [r["metrics"].get("prompt_tokens") for r in result["runs"]]
    known = [t for t in per_run if t is not None]
    tokens = sum(known) / len(per_run) if len(known) == len(per_run) else None
    n = adapters.parameter_count(lm)
    settings = (record or {}).get("settings", {})
    virtual = (_number(settings.get("virtual_tokens", 0)) or 0) if (record or {}).get("method") == "prompt" else 0
    k: int | None  # None where the record lacks it
    trainable: int | None
    cpu = None
    if record is None:  # in-context learning: the demonstrations shown (+ the probe's rows)
        k, seconds, trainable, size = result["shots"] + probe_rows, None, 0, None
    else:
        k, seconds, trainable = record.get("k"), record.get("train_seconds"), record.get("trainable_params")
        cpu = record.get("train_cpu_seconds")
        size = adapters.size_bytes(folder) if folder else None
    flops = 2 * n * (tokens + virtual) if n and tokens is not None else None
    return {"k": k, "train_seconds": seconds, "train_cpu_seconds": cpu, "trainable_params": trainable, "adapter_bytes": size,
            "prompt_tokens": tokens, "parameters": n, "flops_per_item": flops}
