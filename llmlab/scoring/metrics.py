"""Metrics of `llmlab eval`: accuracy, macro-F1, per-label scores and the confusion matrix for
classification; ROUGE and exact match for generation; mean, std, min and max over seeds."""

from __future__ import annotations

import statistics
import string
from typing import Sequence

from llmlab.io.evalreport import LabelScores, MetricName, Metrics, SeedRun, Summary


def classification_metrics(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> Metrics:
    """Accuracy, macro-F1 (over the template's labels), per-label precision/recall/F1 and the
    confusion matrix (rows: gold label, columns: predicted label, plus 'unknown' if predicted)."""
    columns = list(labels) + (["unknown"] if any(p not in labels for p in preds) else [])
    confusion = [[0] * len(columns) for _ in labels]
    for gold, pred in zip(golds, preds):
        confusion[labels.index(gold)][columns.index(pred if pred in labels else "unknown")] += 1
    per_label: dict[str, LabelScores] = {}
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


def generation_metrics(preds: Sequence[str], references: Sequence[Sequence[str]]) -> Metrics:
    """ROUGE-1/2/L F-measure (rouge-score, stemmed; best over an item's references) and exact match."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals: dict[MetricName, float] = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    exact = 0
    for pred, refs in zip(preds, references):
        scores = scorer.score_multi(list(refs), pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
        exact += any(normalize_answer(pred) == normalize_answer(r) for r in refs)
    n = len(preds) or 1
    return {"rouge1": totals["rouge1"] / n, "rouge2": totals["rouge2"] / n, "rougeL": totals["rougeL"] / n,
            "exact_match": exact / n}


def rouge_l(preds: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Each prediction's ROUGE-L F-measure (stemmed; best over its references), as generation_metrics
    scores it: the per-item values a paired test compares."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(preds, references)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[SeedRun], task: str) -> Summary:
    """Each metric's mean, std, min and max over the seeds; items/s averaged over seeds."""
    keys: list[MetricName] = ["accuracy", "macro_f1"] if task == "classify" else ["rouge1", "rouge2", "rougeL", "exact_match"]
    summary: Summary = {}
    for key in keys:
        values = [r["metrics"][key] for r in runs]
        mean, std = mean_std(values)
        summary[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    summary["items_per_s"] = statistics.fmean(r["items_per_s"] for r in runs)
    return summary
