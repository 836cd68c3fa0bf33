"""`llmlab classify`: pick a label by scoring each label's text as the continuation of the prompt
(lm-eval-harness's multiple-choice method), with optional contextual calibration, or by generating."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llmlab import console
from llmlab.errors import UsageError
from llmlab.io import Item

METHODS = ("score", "generate")
NORMALIZE = ("none", "length")
# Contextual calibration (Zhao et al. 2021): inputs that carry no content, whose label
# probabilities reveal the prompt's own bias.
CONTENT_FREE = ("N/A", "", "[MASK]")
UNKNOWN = "unknown"


@dataclass
class Classification:
    item: Item
    prediction: str
    probabilities: dict[str, float]  # what the prediction is the argmax of (calibrated when calibrating)
    prompt_tokens: int
    shots: int
    raw_probabilities: dict[str, float] | None = None  # before calibration
    completion: str | None = None  # --method generate: the text the label was read from
    logprobs: dict[str, float] = field(default_factory=dict)  # summed log-probability of each label
    prompt: str = ""  # the exact text the model saw (chat-wrapped when chatting), for the run log


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def calibrate(probs: Sequence[float], p_cf: Sequence[float]) -> list[float]:
    """Divide out the content-free bias and renormalize: argmax of this is the calibrated prediction."""
    adjusted = [p / max(b, 1e-12) for p, b in zip(probs, p_cf)]
    total = sum(adjusted)
    return [a / total for a in adjusted]


def label_from_text(text: str, labels: dict[str, str]) -> str:
    """The label mentioned first in generated text (its verbalizer or its name, any case)."""
    best, where = UNKNOWN, len(text) + 1
    lowered = text.lower()
    for label, verbalizer in labels.items():
        for name in {verbalizer.lower(), label.lower()}:
            match = re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", lowered)
            if match and match.start() < where:
                best, where = label, match.start()
    return best


class Classifier:
    """Classifies items with a classify template's labels."""

    def __init__(self, lm: Any, builder: Any, method: str = "score", normalize: str = "none",
                 calibrate: bool = False, batch_size: int = 16, settings: Any = None):
        if method not in METHODS:
            raise UsageError(f"invalid --method '{method}': choose score or generate")
        if normalize not in NORMALIZE:
            raise UsageError(f"invalid --normalize '{normalize}': choose none or length")
        if calibrate and method != "score":
            raise UsageError("--calibrate needs --method score: it adjusts label probabilities")
        self.lm = lm
        self.builder = builder
        self.template = builder.template
        if self.template.task != "classify" or not self.template.labels:
            raise UsageError(f"template '{self.template.name}' is a {self.template.task} template; "
                             "classify needs one with task: classify and labels")
        self.labels = list(self.template.labels)
        self.method = method
        self.normalize = normalize
        self.calibrate = calibrate
        self.batch_size = batch_size
        self.settings = settings
        self._bias: dict[tuple[int, ...], list[float]] = {}
        self.label_tokens = max(len(lm.continuation_ids(" " + v)) for v in self.template.labels.values())

    def _continuations(self, prompt: Any) -> list[str]:
        return [prompt.answer_prefix + self.template.verbalize(label) for label in self.labels]

    def _score(self, prompts: Sequence[Any]) -> list[tuple[list[float], list[float]]]:
        """(label probabilities, label log-probabilities) for each prompt."""
        from llmlab.models import LLRequest

        requests = [LLRequest(p.text, c, p.chat, prefix=p.prefix, context_ids=p.ids)
                    for p in prompts for c in self._continuations(p)]
        outputs = self.lm.loglikelihood(requests, batch_size=self.batch_size)
        k = len(self.labels)
        results = []
        for n in range(len(prompts)):
            outs = outputs[n * k : (n + 1) * k]
            logprobs = [o.logprob for o in outs]
            scores = [o.logprob / o.tokens for o in outs] if self.normalize == "length" else logprobs
            results.append((softmax(scores), logprobs))
        return results

    def bias(self, shots: list[int]) -> list[float]:
        """p_cf: mean label probabilities of the content-free inputs under these demonstrations."""
        key = tuple(shots)
        if key not in self._bias:
            prompts = []
            for text in CONTENT_FREE:
                values = {f: text for f in self.template.fields}
                prompts.append(self.builder.build(Item(-1, values, f"content-free input {text!r}"),
                                                  self.label_tokens, shots=list(shots)))
            probs = [p for p, _ in self._score(prompts)]
            self._bias[key] = [sum(col) / len(col) for col in zip(*probs)]
            if console.verbose():
                shown = ", ".join(f"{label} {p:.3f}" for label, p in zip(self.labels, self._bias[key]))
                console.note(f"calibration bias p_cf (shots {list(key)}): {shown}")
        return self._bias[key]

    def classify(self, items: Sequence[Item], on_result: Callable[[Classification], None] | None = None,
                 chunk: int = 64) -> list[Classification]:
        """Classify in chunks; on_result gets each result as soon as its chunk is done."""
        results = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            prompts = [self.builder.build(item, self.label_tokens) for item in part]
            for prompt in prompts:
                for note in prompt.notes:
                    console.warn(note)
            done = self._by_generation(part, prompts) if self.method == "generate" else self._by_score(part, prompts)
            for result in done:
                results.append(result)
                if on_result:
                    on_result(result)
        return results

    def _by_score(self, items: Sequence[Item], prompts: Sequence[Any]) -> list[Classification]:
        out = []
        for item, prompt, (probs, logprobs) in zip(items, prompts, self._score(prompts)):
            raw = None
            if self.calibrate:
                raw, probs = probs, calibrate(probs, self.bias(prompt.shots))
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append(Classification(
                item, self.labels[best], dict(zip(self.labels, probs)), prompt.tokens, len(prompt.shots),
                dict(zip(self.labels, raw)) if raw else None, logprobs=dict(zip(self.labels, logprobs)),
                prompt=prompt.text,
            ))
        return out

    def _by_generation(self, items: Sequence[Item], prompts: Sequence[Any]) -> list[Classification]:
        from llmlab.models import GenRequest

        outputs = self.lm.generate([GenRequest(p.text, p.chat) for p in prompts], self.settings,
                                   batch_size=self.batch_size)
        out = []
        for item, prompt, output in zip(items, prompts, outputs):
            text = output.completions[0]
            label = label_from_text(text, self.template.labels)
            probs = {lab: float(lab == label) for lab in self.labels}
            out.append(Classification(item, label, probs, prompt.tokens, len(prompt.shots), completion=text,
                                      prompt=prompt.text))
        return out


def record(result: Classification, template: Any, model_name: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": result.item.index, **result.item.fields, "prediction": result.prediction}
    if template.target and template.target in result.item.fields:
        rec["correct"] = result.prediction == str(result.item.fields[template.target])
    rec["probabilities"] = {k: round(v, 6) for k, v in result.probabilities.items()}
    if result.raw_probabilities is not None:
        rec["raw_probabilities"] = {k: round(v, 6) for k, v in result.raw_probabilities.items()}
    if result.completion is not None:
        rec["completion"] = result.completion
    rec["prompt_tokens"] = result.prompt_tokens
    rec["shots"] = result.shots
    rec["model"] = model_name
    return rec
