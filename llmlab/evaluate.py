"""`llmlab eval`: run templates x shots x seeds x calibration over labeled data; real metrics."""

from __future__ import annotations

import json
import os
import platform

import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmlab import __version__, console
from llmlab.errors import DataError, UsageError
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


# ---------------------------------------------------------------- running


@dataclass
class Combo:
    template: Any
    shots: int
    calibrate: str  # off or a calibration method (classify.CALIBRATIONS)
    seeds: list[int]


def plan(templates: Sequence[Any], shots: Sequence[int], seeds: int, calibration: str, method: str) -> list[Combo]:
    """Every combination; zero-shot needs one seed only (no demonstrations to draw)."""
    methods = parse_calibration(calibration)
    combos = []
    for template in templates:
        modes = ["off"]
        if template.task == "classify" and method == "score":
            modes = methods
        for n in shots:
            for calibrate in modes:
                combos.append(Combo(template, n, calibrate, list(range(seeds)) if n else [0]))
    return combos


def parse_shots(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"invalid --shots '{text}': give counts like 0,1,4,8") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"invalid --shots '{text}': give counts >= 0 like 0,1,4,8")
    return list(dict.fromkeys(values))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"llmlab": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "rouge-score", "tokenizers"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def check_report_path(path: str) -> None:
    """Fail before the run, not after it, when the report can't be written there."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise DataError(f"report folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise DataError(f"report folder '{parent}' is not writable")


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
    keys = ["accuracy", "macro_f1"] if task == "classify" else ["rouge1", "rouge2", "rougeL", "exact_match"]
    summary = {}
    for key in keys:
        mean, std = mean_std([r["metrics"][key] for r in runs])
        summary[key] = {"mean": mean, "std": std}
    summary["items_per_s"] = statistics.fmean(r["items_per_s"] for r in runs)
    return summary


def validate(items: list[Item], templates: Sequence[Any], references: Sequence[str]) -> dict[str, list[str]]:
    """Check the data against every template before any model time is spent; returns each
    generate template's reference fields by template name."""
    return {template.name: check_data(items, template, references) for template in templates}


def run_combo(lm: Any, combo: Combo, items: list[Item], refs_fields: list[str], options: dict[str, Any],
              progress: Any) -> dict[str, Any]:
    """All seeds of one combination: predictions, metrics per seed, mean and std."""
    from llmlab import classify, generation, prompts
    from llmlab.models import GenRequest
    from llmlab.settings import build as build_settings, normalize_keys

    template = combo.template
    chat = generation.use_chat(lm.tokenizer, options["chat"] or template.chat or "auto")
    runs = []
    layers = [normalize_keys(template.generation, template.name)] if template.generation else []
    settings = build_settings(*layers, options["generation"])
    for seed in combo.seeds:
        # Seeds only matter if the draw is random, so generate templates draw at random here.
        build_opts = prompts.options_for(template, combo.shots, options["shot_selection"], seed, chat,
                                         options["shot_format"], options["overflow"], settings.max_new_tokens,
                                         default_selection="random")
        builder = prompts.make_builder(template, lm.tokenizer, lm.window, build_opts, options["examples"],
                                       options["data"], lm.is_encoder_decoder, lm=lm)
        started = time.perf_counter()
        samples = []
        if template.task == "classify":
            clf = classify.Classifier(lm, builder, options["method"], options["normalize"], combo.calibrate,
                                      options["batch_size"], settings, options.get("ensemble", 1))
            results = clf.classify(items, on_result=lambda r: progress.advance(1))
            elapsed = time.perf_counter() - started
            golds = [str(i.fields[template.target]) for i in items]
            preds = [r.prediction for r in results]
            metrics = classification_metrics(golds, preds, list(template.labels))
            if options["log_samples"]:
                samples = [classify.record(r, template, lm.name) for r in results]
        else:
            jobs = generation.template_jobs(builder, items)
            outputs = lm.generate([GenRequest(j.model_text, j.chat) for j in jobs], settings,
                                  batch_size=options["batch_size"],
                                  on_output=lambda i, o: progress.advance(1))
            elapsed = time.perf_counter() - started
            preds = [o.completions[0].strip() for o in outputs]
            refs = [[str(i.fields[f]) for f in refs_fields] for i in items]
            metrics = generation_metrics(preds, refs)
            if options["log_samples"]:
                samples = [{"index": i.index, **i.fields, "prompt": j.prompt, "completion": p, "references": r}
                           for i, j, p, r in zip(items, jobs, preds, refs)]
        run = {"seed": seed, "metrics": metrics, "items": len(items), "seconds": elapsed,
               "items_per_s": len(items) / elapsed if elapsed else 0.0}
        if options["log_samples"]:
            run["samples"] = samples
        runs.append(run)
    return {"template": template.name, "task": template.task, "shots": combo.shots,
            "calibrate": combo.calibrate, "seeds": combo.seeds, "summary": summarize(runs, template.task),
            "runs": runs}


def evaluate(lm: Any, templates: Sequence[Any], items: list[Item], shots: Sequence[int], seeds: int,
             calibration: str, options: dict[str, Any], on_result: Any = None,
             refs: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run every combination; `refs` is validate()'s result when the caller already checked the data."""
    combos = plan(templates, shots, seeds, calibration, options["method"])
    if refs is None:
        refs = validate(items, templates, options["references"])
    total = sum(len(items) * len(c.seeds) for c in combos)
    results = []
    with console.progress(total, "evaluating") as bar:
        for combo in combos:
            result = run_combo(lm, combo, items, refs[combo.template.name], options, bar)
            results.append(result)
            if on_result:
                on_result(result)
    return {
        "llmlab": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["llmlab", *sys.argv[1:]]) if sys.argv else "llmlab eval",
        "model": {"name": lm.name, "type": getattr(lm.model.config, "model_type", None),
                  "encoder_decoder": lm.is_encoder_decoder, "device": lm.device,
                  "dtype": str(lm.model.dtype).removeprefix("torch."), "window": lm.window},
        "data": {"path": options["data"], "items": len(items), "limit": options.get("limit")},
        "config": {"shots": list(shots), "seeds": seeds, "calibration": calibration,
                   **{k: v for k, v in options.items() if k not in ("data", "limit", "generation")},
                   "generation": {k: v for k, v in options["generation"].items() if v is not None}},
        "templates": {t.name: {"path": str(t.path), "task": t.task, "text": t.source_text} for t in templates},
        "results": results,
        "versions": versions(),
    }


# ---------------------------------------------------------------- the table


def _pm(stat: dict[str, float], scale: float = 100.0) -> str:
    if stat["std"]:
        return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    results = report["results"]
    classify_rows = [r for r in results if r["task"] == "classify"]
    headers = ["template", "shots", "calibrated", "seeds", "n"]
    if classify_rows:
        headers += ["accuracy %", "macro-F1 %", "per-label P/R %", "confusion (rows gold)"]
    if len(classify_rows) < len(results):
        headers += ["ROUGE-1", "ROUGE-2", "ROUGE-L", "exact %"]
    headers.append("items/s")
    rows = []
    for r in results:
        s = r["summary"]
        calibrated = {True: "contextual", False: "off"}.get(r["calibrate"], r["calibrate"])  # old reports: bools
        row = [r["template"], str(r["shots"]), calibrated, str(len(r["seeds"])),
               str(r["runs"][0]["items"])]
        if classify_rows:
            if r["task"] == "classify":
                last = r["runs"][-1]["metrics"]
                pr = " ".join(f"{k}:{v['precision'] * 100:.0f}/{v['recall'] * 100:.0f}" for k, v in last["per_label"].items())
                conf = " ".join(f"{lab}:{row}" for lab, row in zip(last["confusion"]["labels"], last["confusion"]["matrix"]))
                row += [_pm(s["accuracy"]), _pm(s["macro_f1"]), pr, conf.replace(", ", ",")]
            else:
                row += ["", "", "", ""]
        if len(classify_rows) < len(results):
            if r["task"] == "generate":
                row += [_pm(s["rouge1"]), _pm(s["rouge2"]), _pm(s["rougeL"]), _pm(s["exact_match"])]
            else:
                row += ["", "", "", ""]
        row.append(f"{s['items_per_s']:.1f}")
        rows.append(row)
    return headers, rows


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


