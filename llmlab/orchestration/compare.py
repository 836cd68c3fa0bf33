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
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping, Optional, Sequence, TypedDict

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM
    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.core.console import Bar
    from llmlab.io.evalreport import Paired
    from llmlab.io.items import Item
    from llmlab.orchestration.session import Hooks, RunLog, Session
    from llmlab.prompting.templates import Template
    from llmlab.scoring.probe import Source

# A logged run or item as the run log reads it back (runs.runquery: one dict per SQLite row).
Logged = Mapping[str, object]


class CompareOptions(TypedDict):
    """`llmlab compare`'s settings shared by every variant (logged with each variant's run)."""

    input: str
    shots: Optional[int]
    seed: Optional[int]
    method: str
    calibration: Optional[str]
    field: str
    reference: Optional[str]
    device: str
    dtype: str
    chat: Optional[str]
    batch_size: int
    generation: dict[str, object]  # generation flags: max_new_tokens, seed
    model: ModelConfig
    probes: dict[str, Optional[Source]]  # template name -> its probe rows (calibration probe), else None


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


def _text(value: object) -> str | None:
    """A logged TEXT column: None when NULL."""
    return None if value is None else str(value)


def _input_text(item: Logged) -> str:
    """The input's own fields (extra["input"], as logged), without the id and the gold label in any
    form (label, label_id, label_text...: never `text | 0`); else the prompt's end."""
    extra = item.get("extra")
    fields = extra.get("input") if isinstance(extra, dict) else None
    if isinstance(fields, dict):
        shown = [str(v) for k, v in fields.items()
                 if k != "id" and "label" not in k.lower() and str(v) != item.get("gold")]
        if shown:
            return " | ".join(shown)
    return (_text(item.get("prompt")) or "")[-200:]


def matrix(runs: Sequence[Logged], items_of: Callable[[int], Sequence[Logged]]) -> Matrix:
    """The matrix of logged runs: a column per (run, template), a row per (combination, input key).
    Items are matched by key across columns; a column without a row's input shows an empty cell."""
    columns: list[Column] = []
    cells: dict[tuple[str, str], dict[int, Cell]] = {}
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        run_id = run["id"]
        assert isinstance(run_id, int)  # the runs table's INTEGER PRIMARY KEY
        by_template: dict[str, list[Logged]] = {}
        for item in items_of(run_id):
            by_template.setdefault(_text(item["template"]) or "", []).append(item)
        for template, found in by_template.items():
            task = "classify" if any(i["prediction"] is not None for i in found) else "generate"
            name = template or run.get("model") or run.get("command")
            column = len(columns)
            label = _text(run.get("label")) or f"#{run_id} {name}"
            columns.append(Column(label, run_id, template, task))
            for item in found:
                at = (_text(item["combo"]) or "", _text(item["key"]) or "")
                if at not in rows:
                    index = item["idx"]
                    rows[at] = Row(*at, index if isinstance(index, int) else 0, _input_text(item), _text(item["gold"]))
                value = _text(item["prediction"] if task == "classify" else item["output"])
                correct = None if task != "classify" or item["gold"] is None else item["prediction"] == item["gold"]
                probabilities = item.get("probabilities")
                cells.setdefault(at, {})[column] = Cell(value or "", correct, _text(item["prompt"]) or "",
                                                        probabilities if isinstance(probabilities, dict) else None)
    ordered = sorted(rows.values(), key=lambda r: (_natural(r.combo), r.index, r.key))
    for row in ordered:
        row.cells = [cells[(row.combo, row.key)].get(n) for n in range(len(columns))]
    tasks = {c.task for c in columns}
    result = Matrix(tasks.pop() if len(tasks) == 1 else "mixed", columns, ordered)
    _score(result)
    return result


def _natural(text: str) -> list[int | str]:
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


def baseline_column(m: Matrix, wanted: str | None, run_ids: bool = False) -> int:
    """The column `--baseline` names: a column label, or (runs compare) a run id (its first column);
    None = the first column."""
    if wanted is None:
        return 0
    for n, c in enumerate(m.columns):
        if c.label == wanted or (run_ids and str(c.run_id) == wanted.lstrip("#")):
            return n
    shown = ", ".join(str(c.run_id) if run_ids else repr(c.label) for c in m.columns)
    raise UsageError(f"--baseline {wanted!r} is not one of the compared {'runs' if run_ids else 'variants'}: "
                     f"choose one of {shown}")


def paired(m: Matrix, baseline: int = 0, seed: int = 0) -> list[Paired]:
    """Every other scored column against the baseline column on the rows both have (with a gold):
    orchestration.paired's entries (row/baseline = column numbers), Holm-corrected over them."""
    from llmlab.orchestration.paired import Pair, compared

    pairs: list[Pair] = []
    if m.columns[baseline].metric is None:
        return []
    for n, column in enumerate(m.columns):
        if n == baseline or column.metric is None or column.task != m.columns[baseline].task:
            continue
        both = [row for row in m.rows if row.gold is not None and row.cells[n] and row.cells[baseline]]
        if both:
            pairs.append((n, baseline, _cell_scores(m, baseline, both), _cell_scores(m, n, both),
                          column.task == "classify"))
    return compared(pairs, seed)


def _cell_scores(m: Matrix, n: int, rows: Sequence[Row]) -> list[float]:
    """Column n's per-row score on `rows`: 1/0 (classify), ROUGE-L F against the gold (generate)."""
    cells = [row.cells[n] for row in rows]
    if m.columns[n].task == "classify":
        return [float(c is not None and c.correct is True) for c in cells]
    from llmlab.scoring.metrics import rouge_l

    return rouge_l([c.value if c is not None else "" for c in cells], [[str(row.gold)] for row in rows])


def select(m: Matrix, which: str) -> list[Row]:
    """all, differing (the columns disagree) or wrong (some column is wrong)."""
    if which == "differing":
        return [r for r in m.rows if r.differs]
    if which == "wrong":
        return [r for r in m.rows if r.wrong]
    return list(m.rows)


def records(m: Matrix, rows: Sequence[Row]) -> list[dict[str, object]]:
    """One flat record per row (JSONL/CSV): input, gold, then each column's value (and correct mark)."""
    out = []
    for row in rows:
        rec: dict[str, object] = {"combo": row.combo, "key": row.key, "input": row.input, "gold": row.gold}
        for column, cell in zip(m.columns, row.cells):
            rec[column.label] = None if cell is None else cell.value
            if column.task == "classify" and row.gold is not None:
                rec[f"{column.label} correct"] = None if cell is None else cell.correct
        out.append(rec)
    return out


def summary(m: Matrix, paired: Sequence[Paired] = ()) -> dict[str, object]:
    """The last JSONL record: each column's metric, and the paired differences against the baseline
    (columns by label)."""
    out: dict[str, object] = {"summary": True,
                              **{c.label: {c.metric_name: c.metric} if c.metric_name else None for c in m.columns}}
    if paired:
        out["paired"] = [{**e, "row": m.columns[e["row"]].label, "baseline": m.columns[e["baseline"]].label}
                         for e in paired]
    return out


# ---------------------------------------------------------------- llmlab compare: running variants


class VariantItem(TypedDict):
    """One input's result in one variant, as run_variant hands it on (a run log item)."""

    index: int
    key: str
    prompt: str
    gold: str | None
    extra: dict[str, object]  # {"input": the item's fields}
    output: str | None  # the completion (classify --method generate: the text the label was read from)
    prediction: str | None  # classify
    probabilities: dict[str, float] | None  # classify


@dataclass
class Variant:
    label: str
    template: Template | None = None  # None for plain prompts
    model: str | None = None
    preset: Path | None = None  # a YAML generation preset


def variants(templates: Sequence[Template], models: Sequence[str], presets: Sequence[Path]) -> list[Variant]:
    """Every template x model x preset; at least two, all of one task."""
    found = []
    unset: list[None] = [None]  # the one "variant" of an axis that was not given
    for t, m, p in itertools.product(templates or unset, models or unset, presets or unset):
        # A variant's label names only what varies: the template, the model (its folder's name), the preset.
        parts = [t.name if t is not None and len(templates) > 1 else None, Path(m).name if m and len(models) > 1 else None,
                 p.stem if p and len(presets) > 1 else None]
        found.append(Variant(" / ".join(x for x in parts if x) or "default", t, m, p))
    if len(found) < 2:
        raise UsageError("nothing to compare: give two or more --template, --model or --config")
    tasks = {v.template.task if v.template else "generate" for v in found}
    if len(tasks) > 1:
        raise UsageError("mixed tasks: compare classify templates with classify templates, generate with generate")
    return found


def check_baseline(chosen: Sequence[Variant], baseline: str | None) -> None:
    """compare's --baseline names one of the variants (checked before any model time)."""
    if baseline is not None and baseline not in [v.label for v in chosen]:
        raise UsageError(f"--baseline '{baseline}' is not a compared variant: choose one of "
                         f"{', '.join(repr(v.label) for v in chosen)}")


def run_variant(variant: Variant, items: Sequence[Item], opts: CompareOptions, sessions: dict[str | None, Session],
                on_item: Callable[[VariantItem], None], on_warn: Callable[[str], None] | None = None) -> LM:
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

    def emit(item: Item, prompt: str, output: str | None, prediction: str | None = None,
             probabilities: dict[str, float] | None = None) -> None:
        on_item({"index": item.index, "key": item.key, "prompt": prompt, "gold": gold[item.index],
                 "extra": {"input": item.fields}, "output": output, "prediction": prediction,
                 "probabilities": probabilities})

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


def _variant_prompt(variant: Variant, opts: CompareOptions,
                    hooks: Hooks) -> tuple[ModelConfig, PromptConfig, str | None]:
    """(model config, prompt config, --calibration) of a variant: a model with an adapter scores the
    prompts it was trained on (its shots and chat mode, uncalibrated) unless --shots/--calibration say."""
    from dataclasses import replace

    from llmlab.core.config import PromptConfig
    from llmlab.orchestration import adapted

    shots, seed, flag = opts["shots"], opts["seed"], opts["calibration"]
    model = replace(opts["model"], spec=variant.model)
    prompt = PromptConfig(variant.template.name if variant.template else "", shots, seed=seed)
    if variant.template is None or not adapted.adapters_in(model):
        return model, prompt, flag
    model, prompt = adapted.adapter_defaults(model, prompt, variant.template, hooks)
    return model, prompt, flag or "off"


def probe_for(template: Template, calibration: str | None, method: str) -> Source | None:
    """The template's probe rows (scoring.probe.Source) when its resolved calibration is probe, read
    and checked now, before any model time; else None."""
    from llmlab.orchestration import resolve
    from llmlab.orchestration.session import probe_source

    return probe_source(None, resolve.calibration(calibration, template, method).value, template)


def run_compare(chosen: Sequence[Variant], items: Sequence[Item], opts: CompareOptions,
                open_run: Callable[..., ContextManager[RunLog]], progress: Bar | None = None,
                on_warn: Callable[[str], None] | None = None) -> Matrix:
    """Run every variant over the same items, each logged as its own `compare` run; the matrix of them.
    on_warn: where prompt warnings go (dropped shots...); the CLI's console.warn."""
    sessions: dict[str | None, Session] = {}
    found: list[list[Logged]] = []
    for variant in chosen:
        kept: list[Logged] = []
        template = variant.template.name if variant.template else ""
        config = {**{k: v for k, v in opts.items() if k not in ("model", "probes")}, "variant": variant.label,
                  "preset": str(variant.preset) if variant.preset else None}
        with open_run("compare", config=config, model=variant.model, templates=variant.template) as log:

            def keep(rec: VariantItem) -> None:
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
