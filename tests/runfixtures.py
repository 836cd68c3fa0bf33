"""Eval runs written through the runlog API the way `llmlab eval` logs them (see runlog's docstring):
every item of every template x shots x seed x calibration, and each combination's real metrics."""

import json
import random
from pathlib import Path

from llmlab.orchestration import evaluate
from llmlab.runs import runlog

DATA = Path(__file__).parent / "data" / "obvious_reviews.jsonl"
LABELS = ["positive", "negative"]


class Template:
    def __init__(self, name, instruction):
        self.name = name
        self.source_text = f"name: {name}\ntask: classify\ninstruction: {instruction}\ninput: 'Review: {{text}}'\n"
        self.instruction = instruction


def rows():
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def eval_run(template, skill, shots=(0, 1, 4), seeds=3, calibration=(False, True)):
    """A logged eval: predictions right with probability `skill` (+ a bit per shot and with calibration),
    drawn from a fixed random stream, so runs are realistic and reproducible. Returns the run id."""
    data = rows()
    argv = ["llmlab", "eval", "-t", template.name, "--data", str(DATA), "--shots", ",".join(map(str, shots)),
            "--seeds", str(seeds), "--calibration", "both"]
    with runlog.open_run("eval", argv, {"shots": list(shots), "seeds": seeds, "calibration": "both"},
                         model="tiny-llama", templates=template, device="cpu", data=str(DATA)) as log:
        for n in shots:
            for calibrate in calibration:
                for seed in range(seeds if n else 1):
                    rng = random.Random(f"{template.name}/{n}/{seed}/{calibrate}")
                    golds, preds = [], []
                    for i, row in enumerate(data):
                        p_right = min(0.97, skill + 0.04 * n + (0.08 if calibrate else 0))
                        right = rng.random() < p_right
                        pred = row["label"] if right else LABELS[1 - LABELS.index(row["label"])]
                        shown = "".join(f"Review: demo {k}\nSentiment: positive\n\n" for k in range(n))
                        prompt = f"{template.instruction}\n\n{shown}Review: {row['text']}\nSentiment:"
                        p = round(0.5 + rng.random() / 2, 4)
                        log.item(i, prompt, prediction=pred, gold=row["label"], key=f"id:{row['id']}",
                                 probabilities={pred: p, LABELS[1 - LABELS.index(pred)]: round(1 - p, 4)},
                                 template=template.name, combo=runlog.combo(n, seed, calibrate),
                                 extra={"input": row})
                        golds.append(row["label"])
                        preds.append(pred)
                    log.result(template.name, "classify", n, seed, calibrate,
                               evaluate.classification_metrics(golds, preds, LABELS), items=len(data), seconds=1.0)
    return log.id


def two_evals():
    a = eval_run(Template("sentiment", "Classify the sentiment of each movie review."), skill=0.6)
    b = eval_run(Template("sentiment-terse", "Positive or negative?"), skill=0.5)
    return a, b
