"""`llmlab eval`: run a plan (templates x shots x seeds x calibration) over labeled data; the JSON
report. The plan and its checks: llmlab.orchestration.evalplan; the metrics: llmlab.scoring.metrics (their public names
are re-exported here)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, TypedDict

from llmlab.io.evalreport import Metrics, ModelFacts, Report, Result, SeedRun

from llmlab import __version__
from llmlab.orchestration.evalplan import (  # noqa: F401 - re-exported
    Combo, EvalPlan, EvalTask, adapter_tasks, check_data, extra_items, load_plan_file, make_plan, parse_task, plan, plan_config, prepare)
from llmlab.scoring.metrics import (  # noqa: F401 - re-exported
    classification_metrics, generation_metrics, mean_std, normalize_answer, rouge_l, summarize)
from llmlab.orchestration import paired

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM, GenOutput
    from llmlab.core.console import Bar
    from llmlab.core.config import ModelConfig
    from llmlab.core.settings import GenerationSettings
    from llmlab.orchestration.session import Hooks, RunLog, Session
    from llmlab.scoring.classify import Classification
    from llmlab.scoring.generation import Job
    from llmlab.prompting.prompts import PromptBuilder

# this module's public names and those it re-exports (callers import them from here)
__all__ = [
    "Combo", "EvalPlan", "EvalTask", "check_data", "check_report_path", "classification_metrics",
    "data_name", "evaluate", "generation_metrics", "load_plan_file", "make_plan", "mean_std", "model_facts", "normalize_answer",
    "parse_task", "plan", "plan_config", "prepare", "run_combo", "summarize",
    "versions", "write_report",
]


def versions() -> dict[str, str]:
    """llmlab, python and the libraries' versions (the run log's list), for the report."""
    from llmlab.runs.runlog import versions as library_versions

    return library_versions()


def check_report_path(path: str) -> None:
    """Fail before the run, not after it, when the report can't be written there."""
    from llmlab.io.records import check_output_path

    check_output_path(path, "--report")


def write_report(path: str, report: Report) -> None:
    """Write the JSON report atomically: a crash never leaves half a file."""
    from llmlab.io.safewrite import replacing

    check_report_path(path)
    with replacing(path) as f:  # a full disk: a clear error, and the previous report stays whole
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------- running


class Where(TypedDict):
    """Which combination a logged item belongs to (the run log's template and combo columns)."""

    template: str
    combo: str


def _run_seed(session: Session, combo: Combo, seed: int, plan_: EvalPlan, settings: GenerationSettings, bar: Bar,
              log: RunLog) -> SeedRun:
    """One seed of one combination: predictions, metrics, speed (and samples with --log-samples).
    Each item goes to the run log `log` as soon as it is scored."""
    from llmlab.runs import runlog

    # Seeds only matter if the draw is random, so generate templates draw at random here.
    prompt = replace(plan_.prompt, shots=combo.shots, seed=seed)
    builder = session.builder(combo.template, prompt, settings.max_new_tokens, combo.task.data,
                              default_selection="random")
    where: Where = {"template": combo.template.name, "combo": runlog.combo(combo.shots, seed, combo.calibrate)}
    measure = _classify_seed if combo.template.task == "classify" else _generate_seed
    metrics, samples, elapsed, scores = measure(session, combo, builder, plan_, settings, bar, log, where)
    n = len(combo.task.items)
    run: SeedRun = {"seed": seed, "metrics": metrics, "items": n, "seconds": elapsed,
           "items_per_s": n / elapsed if elapsed > 0 else 0.0, paired.KEY: scores}
    if plan_.log_samples:
        run["samples"] = samples
    return run


def _live(logged: Callable[..., None], bar: Bar) -> Callable[..., None]:
    """The callback for each item as it is scored: logged at once when this process runs alone
    (with several, process 0 logs every item once they are gathered: _log_gathered), and counted."""
    from llmlab.orchestration import parallel

    alone = parallel.size() == 1

    def done(*result: object) -> None:
        if alone:
            logged(*result)
        bar.advance(1)

    return done


def _log_gathered(logged: Callable[..., None], results: Iterable[tuple[object, ...]]) -> None:
    """With several processes, log every gathered item (in input order) once, here."""
    from llmlab.orchestration import parallel

    for result in [] if parallel.size() == 1 else results:
        logged(*result)


def _classify_seed(session: Session, combo: Combo, builder: PromptBuilder, plan_: EvalPlan, settings: GenerationSettings, bar: Bar, log: RunLog,
                   where: Where) -> tuple[Metrics, list[dict[str, object]], float, list[float]]:
    """(metrics, samples, seconds, each row's 1/0 right or wrong) of one seed of a classify combination."""
    from llmlab.scoring import classify
    from llmlab.orchestration import parallel

    template, items, lm = combo.template, combo.task.items, session.lm
    target = template.target or ""  # check_data: a classify template has one
    started = time.perf_counter()
    source = plan_.probe_sources().get(template.name)
    if source is not None:
        source.info = session.hooks.note  # a probe fit is long: said even when piped
    clf = classify.Classifier(lm, builder, plan_.method, plan_.normalize, combo.calibrate, plan_.batch_size,
                              settings, plan_.ensemble, session.hooks.detail, source, session.scores)
    for draw in range(plan_.ensemble if combo.calibrate == "probe" else 0):
        clf.probe(draw)  # fitted (or loaded) before the items; inside `started`, so items/s includes the fit

    def logged(r: Classification) -> None:
        log.item(r.item.index, r.prompt, r.completion, r.prediction, r.probabilities,
                 str(r.item.fields[target]), {"input": r.item.fields}, key=r.item.key, **where)

    # This process's items (all of them when it runs alone); then every process's share, in input order.
    results = clf.classify(parallel.share(items), on_result=_live(logged, bar), chunk=2 * (plan_.batch_size or 16))
    results = parallel.gather(results, len(items))
    _log_gathered(logged, [(r,) for r in results])
    elapsed = parallel.slowest(time.perf_counter() - started)
    golds = [str(i.fields[target]) for i in items]
    metrics = classification_metrics(golds, [r.prediction for r in results], list(template.labels))
    if plan_.adapters:  # eval --adapter's costs, and each item's outcome (rows are compared item by item)
        metrics["prompt_tokens"] = sum(r.prompt_tokens for r in results) / max(1, len(results))
        metrics["correct"] = [r.prediction == g for r, g in zip(results, golds)]
    samples = [classify.record(r, template, lm.name) for r in results] if plan_.log_samples else []
    return metrics, samples, elapsed, [float(r.prediction == g) for r, g in zip(results, golds)]


def _generate_seed(session: Session, combo: Combo, builder: PromptBuilder, plan_: EvalPlan, settings: GenerationSettings, bar: Bar, log: RunLog,
                   where: Where) -> tuple[Metrics, list[dict[str, object]], float, list[float]]:
    """(metrics, samples, seconds, each row's ROUGE-L) of one seed of a generate combination."""
    from llmlab.scoring import generation
    from llmlab.orchestration import parallel
    from llmlab.orchestration import session as sessions

    items, lm = combo.task.items, session.lm
    started = time.perf_counter()
    jobs = generation.template_jobs(builder, items)
    refs = [[str(i.fields[f]) for f in combo.task.refs] for i in items]
    refs_of = {i.index: r for i, r in zip(items, refs)}

    def logged(job: Job, out: GenOutput) -> None:
        i = job.item
        # gold: the first reference (what `runs compare` scores ROUGE-L against); all of them in extra.
        log.item(i.index, job.model_text, out.completions[0].strip(), gold=refs_of[i.index][0],
                 extra={"input": i.fields, "references": refs_of[i.index]}, key=i.key, **where)

    outputs = sessions.run_jobs(lm, parallel.share(jobs), settings, plan_.batch_size, _live(logged, bar))
    outputs = parallel.gather(outputs, len(jobs))
    _log_gathered(logged, zip(jobs, outputs))
    elapsed = parallel.slowest(time.perf_counter() - started)
    preds = [o.completions[0].strip() for o in outputs]
    samples: list[dict[str, object]] = [{"index": i.index, **i.fields, "prompt": j.prompt, "completion": p, "references": r}
               for i, j, p, r in zip(items, jobs, preds, refs)] if plan_.log_samples else []
    return generation_metrics(preds, refs), samples, elapsed, rouge_l(preds, refs)


def run_combo(session: Session, combo: Combo, plan_: EvalPlan, bar: Bar, log: RunLog | None = None) -> Result:
    """All seeds of one combination, with mean, std, min and max over the seeds. log: a run log
    (runlog.open_run) that gets each item as it is scored."""
    from llmlab.runs import runlog
    from llmlab.orchestration.session import settings_for

    log = log or runlog.NoRun()
    settings = settings_for(combo.template, None, {"max_new_tokens": plan_.max_new_tokens})
    runs = [_run_seed(session, combo, seed, plan_, settings, bar, log) for seed in combo.seeds]
    return {"template": combo.template.name, "data": combo.task.data, "data_name": data_name(combo.task.data),
            "task": combo.template.task, "shots": combo.shots, "calibrate": combo.calibrate, "seeds": combo.seeds,
            "sources": combo.sources,
            "summary": summarize(runs, combo.template.task), "runs": runs}


def data_name(path: str) -> str:
    return "stdin" if path == "-" else Path(path).name


def evaluate(session: Session, plan_: EvalPlan, bar: Bar | None = None, log: RunLog | None = None) -> Report:
    """Run every combination of the plan (data already checked); `bar.advance(n)` counts items.
    log (a runlog run, optional) gets each item as it is scored and each combination's metrics
    (log.eval_combo) as soon as the combination is done."""
    from llmlab.runs import runlog
    from llmlab.orchestration.session import _Null

    bar, log = bar or _Null(), log or runlog.NoRun()
    results: list[Result] = []
    sources = plan_.probe_sources() if plan_.adapters else {}
    for combo in plan_.combos():
        results.append(run_combo(session, combo, plan_, bar, log))
        if plan_.adapters:  # beside adapters: the labelled rows it used (shots + the probe's), a learning curve's x
            source = sources.get(combo.task.template.name) if results[-1]["calibrate"] == "probe" else None
            results[-1]["k"] = results[-1]["shots"] + (source.rows if source else 0)
        log.eval_combo(results[-1])
    lm = session.lm
    return {
        "llmlab": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["llmlab", *sys.argv[1:]]) if sys.argv else "llmlab eval",
        "model": model_facts(lm),
        "data": [{"template": t.template.name, "path": t.data, "name": data_name(t.data), "items": len(t.items)}
                 for t in plan_.tasks],
        "config": plan_config(plan_, session.model.chat),
        "templates": {t.template.name: {"path": str(t.template.path), "task": t.template.task,
                                        "text": t.template.source_text} for t in plan_.tasks},
        "results": results,
        # each combination against the first on its data: paired interval and Holm-corrected p
        "paired": paired.differences(results),
        "versions": versions(),
    }


def model_facts(lm: LM) -> ModelFacts:
    """The report's model: name, type, device, dtype, window and placement. A backend without a
    transformers model behind it (FakeLM) has no type, dtype or placement: None."""
    model = getattr(lm, "model", None)
    dtype = getattr(model, "dtype", None)
    return {"name": lm.name, "type": getattr(getattr(model, "config", None), "model_type", None),
            "encoder_decoder": lm.is_encoder_decoder, "device": lm.device,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."), "window": lm.window,
            # --device-map: where accelerate put each module (None: all on `device`)
            "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None}


def run(plan: EvalPlan, model: ModelConfig, hooks: Hooks | None = None, lm: LM | None = None) -> Report:
    """`llmlab eval` on a checked plan: one logged run, each item logged as it is scored and each
    combination's metrics as it finishes. Returns the report (evaluate's)."""
    from llmlab.orchestration import adapted
    from llmlab.orchestration.session import Hooks, loaded

    hooks = hooks or Hooks()

    data = ", ".join(dict.fromkeys(t.data for t in plan.tasks))
    with hooks.open_run("eval", config=plan_config(plan, model.chat), templates=[t.template for t in plan.tasks],
                        data=data) as log:
        session = loaded(model, lm, log, hooks)
        from llmlab.scoring.probe import check_model

        for given in plan.probe_sources().values():  # a probe fitted for another model: before any combination
            check_model(given, session.lm.name)
        with hooks.progress(plan.total() + extra_items(plan), "evaluating") as bar:
            report = evaluate(session, plan, bar, log)
            if plan.adapters:  # in-context rows and adapter rows in one table, with what each cost
                sources = plan.probe_sources()
                for result in report["results"]:
                    source = sources.get(result["template"]) if result["calibrate"] == "probe" else None
                    result["model"] = session.lm.name
                    result["cost"] = adapted.cost(result, session.lm, probe_rows=source.rows if source else 0)
                report["results"] += adapter_rows(plan, model, hooks, bar, log, report["results"])
            return report


def adapter_rows(plan_: EvalPlan, model: ModelConfig, hooks: Hooks, bar: Bar, log: RunLog,
                    report_rows: list[Result]) -> list[Result]:
    """One row per adapter and task of its template: the adapter on the base, its training prompts
    (its shots, no calibration), on the same items as the in-context rows (report_rows), each
    compared with the first of them on its task item by item."""
    from llmlab.backends import adapters
    from llmlab.orchestration import adapted
    from llmlab.orchestration import session as sessions
    from llmlab.orchestration.evalplan import Combo

    results: list[Result] = []
    for folder in plan_.adapters:
        record = adapters.read_record(folder)
        tasks = adapter_tasks(plan_, record)
        if not tasks:
            hooks.warn(f"adapter '{folder}' was trained for template '{record.get('template')}', which this "
                       "eval does not run: skipped")
            continue
        chat = model.chat or ("on" if record.get("chat") else "off")
        run = sessions.Session(replace(model, spec=adapters.join(model.spec, folder), chat=chat), hooks=hooks)
        for task in tasks:
            result = run_combo(run, Combo(task, record.get("shots", 0), "off", [0]), plan_, bar, log)
            result["model"], result["adapter"] = run.lm.name, folder
            result["k"], result["tuned"] = record.get("k"), {"method": record.get("method"), "seed": record.get("seed")}
            result["cost"] = adapted.cost(result, run.lm, record, folder)
            result["cost"]["vs_in_context"] = adapted.versus(result, report_rows, task)
            log.eval_combo(result)
            results.append(result)
    return results
