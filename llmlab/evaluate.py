"""`llmlab eval`: run templates x shots x seeds x calibration over labeled data; real metrics."""

from __future__ import annotations

import json
import os

import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from llmlab import __version__
from llmlab.errors import DataError, UsageError
from llmlab.config import PromptConfig
from llmlab.io import Item

CALIBRATION = ("off", "on", "both")  # on = contextual, both = off,contextual; or a list of methods


def parse_calibration(text: str) -> list[str]:
    """--calibration: a comma list of off, contextual, batch, domain (on = contextual, both = off,contextual)."""
    from llmlab.classify import CALIBRATIONS

    modes: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        named = {"on": ["contextual"], "both": ["off", "contextual"]}.get(part, [part])
        for mode in named:
            if mode not in CALIBRATIONS:
                raise UsageError(f"invalid --calibration '{text}': give off, on, both or a list of "
                                 f"{', '.join(CALIBRATIONS)}")
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise UsageError(f"invalid --calibration '{text}': give off, on, both or a list of methods")
    return modes


# ---------------------------------------------------------------- metrics


def classification_metrics(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the template's labels), per-label precision/recall/F1 and the
    confusion matrix (rows: gold label, columns: predicted label, plus 'unknown' if predicted)."""
    columns = list(labels) + (["unknown"] if any(p not in labels for p in preds) else [])
    confusion = [[0] * len(columns) for _ in labels]
    for gold, pred in zip(golds, preds):
        confusion[labels.index(gold)][columns.index(pred if pred in labels else "unknown")] += 1
    per_label = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(golds)
    return {
        "accuracy": sum(g == p for g, p in zip(golds, preds)) / n if n else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels),
        "per_label": per_label,
        "confusion": {"labels": list(labels), "predicted": columns, "matrix": confusion},
    }


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and extra whitespace (SQuAD-style) for exact match."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def generation_metrics(preds: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (rouge-score, stemmed; best over an item's references) and exact match."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    exact = 0
    for pred, refs in zip(preds, references):
        scores = scorer.score_multi(list(refs), pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
        exact += any(normalize_answer(pred) == normalize_answer(r) for r in refs)
    n = len(preds) or 1
    return {**{k: v / n for k, v in totals.items()}, "exact_match": exact / n}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------- data checks


def check_data(items: list[Item], template: Any, references: Sequence[str]) -> list[str]:
    """Validate labeled data for a template; returns the reference fields for generate templates."""
    from llmlab import io, prompts

    io.check_unique_ids(items)
    prompts.require_fields(items, template)
    if template.task == "classify":
        for item in items:
            if template.target not in item.fields:
                raise DataError(f"{item.source}: no label field '{template.target}' "
                                f"(fields: {', '.join(item.fields)})")
            if str(item.fields[template.target]) not in template.labels:
                raise DataError(f"{item.source}: label '{item.fields[template.target]}' is not one of "
                                f"template '{template.name}''s labels: {', '.join(template.labels)}")
        return []
    fields = list(references) or [f for f in [template.target, *template.references] if f]
    present = [f for f in fields if all(f in item.fields for item in items)]
    if not present:
        raise DataError(f"no reference field for template '{template.name}' in every row "
                        f"(looked for {', '.join(fields) or 'none'}; fields: {', '.join(items[0].fields)}); "
                        "name one with --reference FIELD")
    return present


# ---------------------------------------------------------------- the plan


@dataclass
class Combo:
    task: "EvalTask"
    shots: int
    calibrate: str  # off or a calibration method (classify.CALIBRATIONS)
    seeds: list[int]

    @property
    def template(self) -> Any:
        return self.task.template


@dataclass
class EvalTask:
    """One template and the labeled data it is measured on."""

    template: Any
    data: str  # the data file's path ("-" = stdin)
    items: list[Item]
    refs: list[str] = field(default_factory=list)  # reference fields (generate templates)


@dataclass
class EvalPlan:
    """Everything `llmlab eval` runs: each task x shot count x seed x calibration."""

    tasks: list[EvalTask]
    shots: list[int]
    seeds: int = 1  # demonstration draws per shot count (seeds 0..N-1)
    calibration: str = "off"  # off, on, both, or a comma list of off, contextual, batch, domain
    method: str = "score"
    normalize: str = "none"
    batch_size: Optional[int] = 16
    prompt: PromptConfig = field(default_factory=PromptConfig)  # selection, format, overflow, examples
    max_new_tokens: Optional[int] = None
    log_samples: bool = False
    references: list[str] = field(default_factory=list)
    offset: int = 0
    limit: Optional[int] = None
    ensemble: int = 1  # demonstration draws whose label probabilities are averaged (classify)

    def combos(self) -> list[Combo]:
        return plan(self.tasks, self.shots, self.seeds, self.calibration, self.method)

    def total(self) -> int:
        """Items this process scores over the whole run (all of them when it runs alone): the
        progress bar's total."""
        from llmlab.parallel import share_count

        return sum(share_count(len(c.task.items)) * len(c.seeds) for c in self.combos())


def plan(tasks: Sequence[EvalTask], shots: Sequence[int], seeds: int, calibration: str, method: str) -> list[Combo]:
    """Every combination; zero-shot needs one seed only (no demonstrations to draw)."""
    methods = parse_calibration(calibration)
    if seeds < 1:
        raise UsageError(f"invalid --seeds {seeds}: must be >= 1")
    combos = []
    for task in tasks:
        modes = ["off"]
        if task.template.task == "classify" and method == "score":
            modes = methods
        for n in shots:
            for calibrate in modes:
                combos.append(Combo(task, n, calibrate, list(range(seeds)) if n else [0]))
    return combos


def parse_shots(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"invalid --shots '{text}': give counts like 0,1,4,8") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"invalid --shots '{text}': give counts >= 0 like 0,1,4,8")
    return list(dict.fromkeys(values))


def parse_task(spec: str, default_data: Optional[str]) -> tuple[str, str]:
    """-t NAME or -t NAME=DATA: a template and the data file it is measured on."""
    name, sep, data = spec.partition("=")
    if sep and data.strip():
        return name.strip(), data.strip()
    if default_data is None:
        raise UsageError(f"template '{name}' has no data: give --data FILE, or -t {name}=FILE")
    return name.strip(), default_data


def load_plan_file(path: str) -> list[tuple[str, str]]:
    """--plan FILE: a YAML mapping with `tasks:`, a list of {template: NAME, data: FILE}; relative
    data paths are read from the plan's folder."""
    from llmlab.yamlfile import load_yaml_mapping

    raw = load_yaml_mapping(Path(path), "eval plan")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise UsageError(f"{path}: an eval plan needs 'tasks:', a list of {{template: NAME, data: FILE}}")
    unknown = sorted(set(raw) - {"tasks"})
    if unknown:
        raise UsageError(f"{path}: unknown key '{unknown[0]}' (an eval plan has only 'tasks')")
    out = []
    for n, task in enumerate(tasks, 1):
        if not isinstance(task, dict) or not isinstance(task.get("template"), str) or not isinstance(task.get("data"), str):
            raise UsageError(f"{path}: task {n} needs 'template' and 'data' (strings)")
        data = Path(task["data"]).expanduser()
        if not data.is_absolute():
            data = Path(path).parent / data
        out.append((task["template"], str(data)))
    return out


def versions() -> dict[str, str]:
    """llmlab, python and the libraries' versions (the run log's list), for the report."""
    from llmlab.runlog import versions as library_versions

    return library_versions()


def check_report_path(path: str) -> None:
    """Fail before the run, not after it, when the report can't be written there."""
    from llmlab.io import check_output_path

    check_output_path(path, "--report")


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write the JSON report atomically: a crash never leaves half a file."""
    target = Path(path)
    check_report_path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name, dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(runs: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Each metric's mean, std, min and max over the seeds; items/s averaged over seeds."""
    keys = ["accuracy", "macro_f1"] if task == "classify" else ["rouge1", "rouge2", "rougeL", "exact_match"]
    summary: dict[str, Any] = {}
    for key in keys:
        values = [r["metrics"][key] for r in runs]
        mean, std = mean_std(values)
        summary[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    summary["items_per_s"] = statistics.fmean(r["items_per_s"] for r in runs)
    return summary


# ---------------------------------------------------------------- running


def _run_seed(session: Any, combo: Combo, seed: int, plan_: EvalPlan, settings: Any, bar: Any,
              log: Any) -> dict[str, Any]:
    """One seed of one combination: predictions, metrics, speed (and samples with --log-samples).
    Each item goes to the run log `log` as soon as it is scored."""
    from llmlab import classify, parallel, runlog, session as sessions

    template, items, lm = combo.template, combo.task.items, session.lm
    where = {"template": template.name, "combo": runlog.combo(combo.shots, seed, combo.calibrate)}
    mine = parallel.share(items)  # this process's items (all of them when it runs alone)
    alone = parallel.size() == 1  # else items are logged once gathered, by process 0
    # Seeds only matter if the draw is random, so generate templates draw at random here.
    prompt = replace(plan_.prompt, shots=combo.shots, seed=seed)
    builder = session.builder(template, prompt, settings.max_new_tokens, combo.task.data, default_selection="random")
    started = time.perf_counter()
    samples: list[dict[str, Any]] = []
    if template.task == "classify":
        clf = classify.Classifier(lm, builder, plan_.method, plan_.normalize, combo.calibrate, plan_.batch_size,
                                  settings, plan_.ensemble)

        def logged(r: Any) -> None:
            log.item(r.item.index, r.prompt, r.completion, r.prediction, r.probabilities,
                     str(r.item.fields[template.target]), {"input": r.item.fields}, key=r.item.key, **where)

        def scored(r: Any) -> None:
            if alone:
                logged(r)
            bar.advance(1)

        results = clf.classify(mine, on_result=scored, chunk=2 * (plan_.batch_size or 16))
        results = parallel.gather(results, len(items))  # every process's share, in input order
        for r in [] if alone else results:
            logged(r)
        elapsed = parallel.slowest(time.perf_counter() - started)
        golds = [str(i.fields[template.target]) for i in items]
        metrics = classification_metrics(golds, [r.prediction for r in results], list(template.labels))
        if plan_.log_samples:
            samples = [classify.record(r, template, lm.name) for r in results]
    else:
        from llmlab import generation

        jobs = generation.template_jobs(builder, items, session.hooks.warn)
        refs = [[str(i.fields[f]) for f in combo.task.refs] for i in items]
        refs_of = {i.index: r for i, r in zip(items, refs)}

        def logged(job: Any, out: Any) -> None:
            i = job.item
            # gold: the first reference (what `runs compare` scores ROUGE-L against); all of them in extra.
            log.item(i.index, job.model_text, out.completions[0].strip(), gold=refs_of[i.index][0],
                     extra={"input": i.fields, "references": refs_of[i.index]}, key=i.key, **where)

        def generated(job: Any, out: Any) -> None:
            if alone:
                logged(job, out)
            bar.advance(1)

        outputs = sessions.run_jobs(lm, parallel.share(jobs), settings, plan_.batch_size, generated)
        outputs = parallel.gather(outputs, len(jobs))
        for job, out in [] if alone else zip(jobs, outputs):
            logged(job, out)
        elapsed = parallel.slowest(time.perf_counter() - started)
        preds = [o.completions[0].strip() for o in outputs]
        metrics = generation_metrics(preds, refs)
        if plan_.log_samples:
            samples = [{"index": i.index, **i.fields, "prompt": j.prompt, "completion": p, "references": r}
                       for i, j, p, r in zip(items, jobs, preds, refs)]
    run = {"seed": seed, "metrics": metrics, "items": len(items), "seconds": elapsed,
           "items_per_s": len(items) / elapsed if elapsed > 0 else 0.0}
    if plan_.log_samples:
        run["samples"] = samples
    return run


def run_combo(session: Any, combo: Combo, plan_: EvalPlan, bar: Any, log: Any = None) -> dict[str, Any]:
    """All seeds of one combination, with mean, std, min and max over the seeds. log: a run log
    (runlog.open_run) that gets each item as it is scored."""
    from llmlab import runlog
    from llmlab.session import settings_for

    log = log or runlog.NoRun()
    settings = settings_for(combo.template, None, {"max_new_tokens": plan_.max_new_tokens})
    runs = [_run_seed(session, combo, seed, plan_, settings, bar, log) for seed in combo.seeds]
    return {"template": combo.template.name, "data": combo.task.data, "data_name": data_name(combo.task.data),
            "task": combo.template.task, "shots": combo.shots, "calibrate": combo.calibrate, "seeds": combo.seeds,
            "summary": summarize(runs, combo.template.task), "runs": runs}


def data_name(path: str) -> str:
    return "stdin" if path == "-" else Path(path).name


def evaluate(session: Any, plan_: EvalPlan, bar: Any = None, log: Any = None) -> dict[str, Any]:
    """Run every combination of the plan (data already checked); `bar.advance(n)` counts items.
    log (a runlog run, optional) gets each item as it is scored and each combination's metrics
    (log.eval_combo) as soon as the combination is done."""
    from llmlab import runlog
    from llmlab.session import _Null

    bar, log = bar or _Null(), log or runlog.NoRun()
    results = []
    for combo in plan_.combos():
        results.append(run_combo(session, combo, plan_, bar, log))
        log.eval_combo(results[-1])
    lm = session.lm
    return {
        "llmlab": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["llmlab", *sys.argv[1:]]) if sys.argv else "llmlab eval",
        "model": {"name": lm.name, "type": getattr(lm.model.config, "model_type", None),
                  "encoder_decoder": lm.is_encoder_decoder, "device": lm.device,
                  "dtype": str(lm.model.dtype).removeprefix("torch."), "window": lm.window,
                  # --device-map: where accelerate put each module (None: all on `device`)
                  "device_map": {k: str(v) for k, v in getattr(lm.model, "hf_device_map", {}).items()} or None},
        "data": [{"template": t.template.name, "path": t.data, "name": data_name(t.data), "items": len(t.items)}
                 for t in plan_.tasks],
        "config": plan_config(plan_, session.model.chat),
        "templates": {t.template.name: {"path": str(t.template.path), "task": t.template.task,
                                        "text": t.template.source_text} for t in plan_.tasks},
        "results": results,
        "versions": versions(),
    }


def plan_config(plan_: EvalPlan, chat: Optional[str]) -> dict[str, Any]:
    """The settings of an eval, as the JSON report and the run log record them."""
    return {"shots": list(plan_.shots), "seeds": plan_.seeds, "calibration": plan_.calibration,
            "method": plan_.method, "normalize": plan_.normalize, "batch_size": plan_.batch_size,
            "offset": plan_.offset, "limit": plan_.limit, "log_samples": plan_.log_samples,
            "references": plan_.references, "chat": chat,
            "shot_selection": plan_.prompt.selection, "shot_format": plan_.prompt.shot_format,
            "overflow": plan_.prompt.overflow, "examples": plan_.prompt.examples,
            "generation": {"max_new_tokens": plan_.max_new_tokens} if plan_.max_new_tokens else {}}


def prepare(specs: Sequence[tuple[str, str]], prompt: PromptConfig, fmt: str, offset: int, limit: Optional[int],
            references: Sequence[str]) -> list[EvalTask]:
    """Templates found, data read (each file once) and checked against its templates, before any
    model time."""
    from llmlab import prompts, session

    session.check_prompt_options(prompt)
    read: dict[str, list[Item]] = {}
    tasks = []
    for name, data in specs:
        template = prompts.find_template(name, prompt.prompts_dir)
        if data not in read:
            read[data] = session.read_input(data, fmt, "text", offset, limit)
        refs = check_data(read[data], template, references)
        tasks.append(EvalTask(template, data, read[data], refs))
    names = [t.template.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup and len({(t.template.name, t.data) for t in tasks}) < len(tasks):
        raise UsageError(f"template '{dup}' is given twice with the same data")
    return tasks
