"""Side by side: one row per input, one column per variant (a run, or a template of an eval run).

`matrix()` builds the comparison from logged items (`runs compare`, `report`); `run_compare()` runs
several templates x models x settings presets over the same inputs (`llmlab compare`), logging each
variant as a run. Everything it needs from the model side goes through `run_variant`, one function.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.orchestration.session import Hooks
    from llmlab.prompting.templates import Template


@dataclass
class Column:
    label: str  # "#12 sentiment": run id and template (or model)
    run_id: int | None
    template: str
    task: str  # classify or generate
    metric_name: str = ""  # accuracy (classify) or rougeL (generate); "" when there is no gold
    metric: float | None = None  # over this column's cells in the matrix


@dataclass
class Cell:
    value: str  # the prediction (classify) or the output (generate)
    correct: bool | None  # classify with a gold label; else None
    prompt: str
    probabilities: dict[str, float] | None = None


@dataclass
class Row:
    combo: str  # the eval combination ("shots=4 seed=1 calibrated"), "" otherwise
    key: str  # the input's identity (id:..., else index:N)
    index: int
    input: str  # the input's text, for display
    gold: str | None
    cells: list[Cell | None] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return len({c.value for c in self.cells if c is not None}) > 1

    @property
    def wrong(self) -> bool:
        return any(c is not None and c.correct is False for c in self.cells)


@dataclass
class Matrix:
    task: str
    columns: list[Column]
    rows: list[Row]


def _input_text(item: dict[str, Any]) -> str:
    """The input's own fields (extra["input"], as logged), without the id and the gold label in any
    form (label, label_id, label_text...: never `text | 0`); else the prompt's end."""
    fields = (item.get("extra") or {}).get("input")
    if isinstance(fields, dict):
        shown = [str(v) for k, v in fields.items()
                 if k != "id" and "label" not in k.lower() and str(v) != item.get("gold")]
        if shown:
            return " | ".join(shown)
    return (item.get("prompt") or "")[-200:]


def matrix(runs: Sequence[dict[str, Any]], items_of: Callable[[int], list[dict[str, Any]]]) -> Matrix:
    """The matrix of logged runs: a column per (run, template), a row per (combination, input key).
    Items are matched by key across columns; a column without a row's input shows an empty cell."""
    columns: list[Column] = []
    cells: dict[tuple[str, str], dict[int, Cell]] = {}
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        by_template: dict[str, list[dict[str, Any]]] = {}
        for item in items_of(run["id"]):
            by_template.setdefault(item["template"], []).append(item)
        for template, found in by_template.items():
            task = "classify" if any(i["prediction"] is not None for i in found) else "generate"
            name = template or run.get("model") or run.get("command")
            column = len(columns)
            label = run.get("label") or f"#{run['id']} {name}"
            columns.append(Column(label, run["id"], template, task))
            for item in found:
                at = (item["combo"], item["key"])
                if at not in rows:
                    rows[at] = Row(item["combo"], item["key"], item["idx"], _input_text(item), item["gold"])
                value = item["prediction"] if task == "classify" else item["output"]
                correct = None if task != "classify" or item["gold"] is None else item["prediction"] == item["gold"]
                cells.setdefault(at, {})[column] = Cell(value or "", correct, item["prompt"] or "",
                                                        item.get("probabilities"))
    ordered = sorted(rows.values(), key=lambda r: (_natural(r.combo), r.index, r.key))
    for row in ordered:
        row.cells = [cells[(row.combo, row.key)].get(n) for n in range(len(columns))]
    tasks = {c.task for c in columns}
    result = Matrix(tasks.pop() if len(tasks) == 1 else "mixed", columns, ordered)
    _score(result)
    return result


def _natural(text: str) -> list[Any]:
    """Sort key: numbers as numbers ("shots=4" before "shots=16")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _score(m: Matrix) -> None:
    """Each column's metric over its cells: accuracy for classify, ROUGE-L F for generate (vs gold)."""
    for n, column in enumerate(m.columns):
        pairs = [(cell, row.gold) for row in m.rows if (cell := row.cells[n]) is not None and row.gold is not None]
        if not pairs:
            continue
        if column.task == "classify":
            column.metric_name, column.metric = "accuracy", sum(c.correct is True for c, _ in pairs) / len(pairs)
        else:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            total = sum(scorer.score(gold, c.value)["rougeL"].fmeasure for c, gold in pairs)
            column.metric_name, column.metric = "rougeL", total / len(pairs)


def select(m: Matrix, which: str) -> list[Row]:
    """all, differing (the columns disagree) or wrong (some column is wrong)."""
    if which == "differing":
        return [r for r in m.rows if r.differs]
    if which == "wrong":
        return [r for r in m.rows if r.wrong]
    return list(m.rows)


def records(m: Matrix, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One flat record per row (JSONL/CSV): input, gold, then each column's value (and correct mark)."""
    out = []
    for row in rows:
        rec: dict[str, Any] = {"combo": row.combo, "key": row.key, "input": row.input, "gold": row.gold}
        for column, cell in zip(m.columns, row.cells):
            rec[column.label] = None if cell is None else cell.value
            if column.task == "classify" and row.gold is not None:
                rec[f"{column.label} correct"] = None if cell is None else cell.correct
        out.append(rec)
    return out


def summary(m: Matrix) -> dict[str, Any]:
    return {"summary": True, **{c.label: {c.metric_name: c.metric} if c.metric_name else None for c in m.columns}}


# ---------------------------------------------------------------- llmlab compare: running variants


@dataclass
class Variant:
    label: str
    template: Template | None = None  # None for plain prompts
    model: str | None = None
    preset: Path | None = None  # a YAML generation preset


def variants(templates: Sequence[Any], models: Sequence[str], presets: Sequence[Path]) -> list[Variant]:
    """Every template x model x preset; at least two, all of one task."""
    found = []
    unset: list[None] = [None]  # the one "variant" of an axis that was not given
    for t, m, p in itertools.product(templates or unset, models or unset, presets or unset):
        # A variant's label names only what varies: the template, the model (its folder's name), the preset.
        parts = [t.name if len(templates) > 1 else None, Path(m).name if m and len(models) > 1 else None,
                 p.stem if p and len(presets) > 1 else None]
        found.append(Variant(" / ".join(x for x in parts if x) or "default", t, m, p))
    if len(found) < 2:
        raise UsageError("nothing to compare: give two or more --template, --model or --config")
    tasks = {v.template.task if v.template else "generate" for v in found}
    if len(tasks) > 1:
        raise UsageError("mixed tasks: compare classify templates with classify templates, generate with generate")
    return found


def run_variant(variant: Variant, items: Sequence[Any], opts: dict[str, Any], sessions: dict[Any, Any],
                on_item: Callable[[dict[str, Any]], None], on_warn: Callable[[str], None] | None = None) -> Any:
    """THE adapter to the model side: open the variant's model through a Session (one per model,
    kept in `sessions`), resolve the template's defaults by the rule every command follows
    (orchestration.resolve), classify or generate, and hand each finished item to on_item as a
    runlog item dict. Returns the loaded model."""
    from llmlab.orchestration import resolve
    from llmlab.orchestration.session import Hooks, Session, requests, settings_for
    from llmlab.scoring import classify, generation

    tmpl = variant.template
    hooks = Hooks(warn=on_warn or (lambda message: None))
    model, prompt, calibration = _variant_prompt(variant, opts, hooks)
    if variant.model not in sessions:
        sessions[variant.model] = Session(model, hooks=hooks)
    session = sessions[variant.model]
    lm = session.lm
    settings = settings_for(tmpl, variant.preset, opts["generation"])
    gold_field = tmpl.target if tmpl else opts.get("reference")
    gold = {it.index: (str(it.fields[gold_field]) if gold_field and gold_field in it.fields else None) for it in items}

    def emit(item: Any, prompt: str, **values: Any) -> None:
        on_item({"index": item.index, "key": item.key, "prompt": prompt, "gold": gold[item.index],
                 "extra": {"input": item.fields}, **values})

    if tmpl is not None:
        builder = session.builder(tmpl, prompt, settings.max_new_tokens, opts["input"])
    if tmpl is not None and tmpl.task == "classify":
        mode = resolve.calibration(calibration, tmpl, opts["method"]).value
        source = opts.get("probes", {}).get(tmpl.name) if mode == "probe" else None
        if source is not None:
            source.info = session.hooks.info
        clf = classify.Classifier(lm, builder, opts["method"], "none", mode, opts["batch_size"], settings,
                                  probe=source, cache=session.scores)
        if source is not None:
            clf.probe(0)  # fitted (or loaded from the cache) before the items
        clf.classify(items, on_result=lambda r: emit(r.item, r.prompt, prediction=r.prediction,
                                                      probabilities=r.probabilities, output=r.completion))
        return lm
    if tmpl is None:
        jobs = generation.plain_jobs(items, opts["field"], lm.tokenizer, session.chat())
    else:
        jobs = generation.template_jobs(builder, items)
    lm.generate(requests(jobs), settings, batch_size=opts["batch_size"],
                on_output=lambda i, out: emit(jobs[i].item, jobs[i].model_text, output=out.completions[0].strip()))
    return lm


def _variant_prompt(variant: Variant, opts: Mapping[str, object],
                    hooks: "Hooks") -> tuple["ModelConfig", "PromptConfig", str | None]:
    """(model config, prompt config, --calibration) of a variant: a model with an adapter scores the
    prompts it was trained on (its shots and chat mode, uncalibrated) unless --shots/--calibration say."""
    from dataclasses import replace

    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.orchestration import adapted

    given, shots, seed, flag = opts["model"], opts["shots"], opts["seed"], opts["calibration"]
    assert isinstance(given, ModelConfig) and (shots is None or isinstance(shots, int))
    assert (seed is None or isinstance(seed, int)) and (flag is None or isinstance(flag, str))
    model = replace(given, spec=variant.model)
    prompt = PromptConfig(variant.template.name if variant.template else "", shots, seed=seed)
    if variant.template is None or not adapted.adapters_in(model):
        return model, prompt, flag
    model, prompt = adapted.adapter_defaults(model, prompt, variant.template, hooks)
    return model, prompt, flag or "off"


def probe_for(template: Template, calibration: str | None, method: str) -> Any:
    """The template's probe rows (scoring.probe.Source) when its resolved calibration is probe, read
    and checked now, before any model time; else None."""
    from llmlab.orchestration import resolve
    from llmlab.orchestration.session import probe_source

    return probe_source(None, resolve.calibration(calibration, template, method).value, template)


def run_compare(chosen: Sequence[Variant], items: Sequence[Any], opts: dict[str, Any], open_run: Callable[..., Any],
                progress: Any = None, on_warn: Callable[[str], None] | None = None) -> Matrix:
    """Run every variant over the same items, each logged as its own `compare` run; the matrix of them.
    on_warn: where prompt warnings go (dropped shots...); the CLI's console.warn."""
    sessions: dict[Any, Any] = {}
    found: list[list[dict[str, Any]]] = []
    for variant in chosen:
        kept: list[dict[str, Any]] = []
        template = variant.template.name if variant.template else ""
        config = {**{k: v for k, v in opts.items() if k not in ("model", "probes")}, "variant": variant.label,
                  "preset": str(variant.preset) if variant.preset else None}
        with open_run("compare", config=config, model=variant.model, templates=variant.template) as log:

            def keep(rec: dict[str, Any]) -> None:
                rec = {"output": None, "prediction": None, "probabilities": None, **rec}
                log.item(rec["index"], rec["prompt"], rec["output"], rec["prediction"], rec["probabilities"],
                         rec["gold"], rec["extra"], key=rec["key"], template=template)
                kept.append({**rec, "idx": rec["index"], "template": template, "combo": ""})
                if progress:
                    progress.advance(1)

            lm = run_variant(variant, items, opts, sessions, keep, on_warn)
            log.update(model=lm.name, device=lm.device)
            column = matrix([{"id": 0, "label": variant.label}], lambda _: kept).columns[0]
            log.metrics({column.metric_name: column.metric} if column.metric_name else {})
        found.append(kept)
    runs = [{"id": n, "label": v.label} for n, v in enumerate(chosen)]
    return matrix(runs, lambda n: found[n])
