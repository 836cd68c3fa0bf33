"""`llmlab classify`: pick a label by scoring each label's text as the continuation of the prompt
(lm-eval-harness's multiple-choice method), with optional contextual calibration, or by generating."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

from llmlab.core.errors import UsageError
from llmlab.core.jsontypes import JSONValue
from llmlab.io.evalreport import ClassifyMetrics
from llmlab.io.render import Classified
from llmlab.io.records import Item

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    import numpy as np
    from numpy.typing import NDArray

    from llmlab.backends.base import LM
    from llmlab.core.settings import GenerationSettings
    from llmlab.prompting.prompts import Prompt, PromptBuilder
    from llmlab.scoring.probe import Probe, Source
    from llmlab.scoring.scorecache import ScoreCache, Scores
    from llmlab.prompting.templates import Template

# One demonstration draw of an item: (prompt, label probabilities, label log-probabilities, hidden states).
Draw = tuple["Prompt", list[float], list[float], "NDArray[np.float32] | None"]

METHODS = ("score", "generate")
NORMALIZE = ("none", "length")
# Calibration: divide each label's probability by an estimate of the prompt's own bias toward it,
# p(y|x) / b(y), renormalized. The methods differ only in how b is estimated:
# - contextual (Zhao et al. 2021, "Calibrate Before Use"): b = mean label probabilities of the
#   content-free inputs "N/A", "" and "[MASK]" under the same demonstrations.
# - domain (Fei et al. 2023, "Mitigating Label Biases for In-context Learning"): b = mean over
#   DOMAIN_SAMPLES content-free inputs made of random in-domain words (drawn from the evaluated
#   inputs' own text, no labels used), each as many words as an input has on average.
# - batch (Zhou et al. 2024, "Batch Calibration"): b = mean label probabilities over the evaluated
#   inputs themselves; no extra prompts, but every input is scored before the first prediction.
# - probe is no division: the label is read from the model's hidden states at the answer position
#   by a logistic regression fitted on labelled rows (--probe-data; llmlab.scoring.probe).
CALIBRATIONS = ("off", "contextual", "batch", "domain", "probe")
CONTENT_FREE = ("N/A", "", "[MASK]")
DOMAIN_SAMPLES = 20  # random in-domain texts averaged per demonstration set (the paper's 20)
UNKNOWN = "unknown"


def calibration_mode(value: bool | str | None) -> str:
    """--calibrate's value as a method name: a bare flag (True) or 'on' is contextual calibration."""
    if value is True or value == "on":
        return "contextual"
    if value is None or value is False:
        return "off"
    if value not in CALIBRATIONS:
        raise UsageError(f"invalid --calibrate '{value}': choose {', '.join(CALIBRATIONS)}")
    return value


def domain_texts(items: Sequence[Item], fields: Sequence[str], seed: int, n: int = DOMAIN_SAMPLES) -> list[str]:
    """Fei et al.'s content-free inputs: n texts of random words from the items' `fields`, each the
    items' mean word count long (at least 1), drawn with a seeded generator."""
    import random

    texts = [" ".join(str(item.fields.get(f, "")) for f in fields) for item in items]
    words = [w for t in texts for w in t.split()]
    if not words:
        return [""] * n
    length = max(1, round(len(words) / max(len(texts), 1)))
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


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
    adjusted = [p / max(b, 1e-300) for p, b in zip(probs, p_cf)]  # floor: only a bias of exactly 0
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


def chunk_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: 1, 2, 4, ... items, doubling up to `chunk`, then `chunk` each. A
    progress bar then moves within the first seconds and its rate settles early, at the cost of a
    few small forward passes (about log2(chunk) of them)."""
    bounds, start, size = [], 0, 1
    while start < total:
        end = min(total, start + min(size, max(1, chunk)))
        bounds.append((start, end))
        start, size = end, size * 2
    return bounds


class Classifier:
    """Classifies items with a classify template's labels."""

    def __init__(self, lm: LM, builder: PromptBuilder, method: str = "score", normalize: str = "none",
                 calibrate: bool | str = False, batch_size: int | None = 16, settings: GenerationSettings | None = None,
                 ensemble: int = 1,
                 on_detail: Callable[[str], None] | None = None, probe: Source | None = None,
                 cache: ScoreCache | None = None):
        if method not in METHODS:
            raise UsageError(f"invalid --method '{method}': choose score or generate")
        if normalize not in NORMALIZE:
            raise UsageError(f"invalid --normalize '{normalize}': choose none or length")
        self.calibrate = calibration_mode(calibrate)
        if self.calibrate != "off" and method != "score":
            raise UsageError("--calibrate needs --method score: it adjusts label probabilities")
        if ensemble < 1:
            raise UsageError(f"invalid --ensemble {ensemble}: give the number of demonstration draws, >= 1")
        if ensemble > 1 and method != "score":
            raise UsageError("--ensemble needs --method score: it averages label probabilities")
        from llmlab.scoring.scorecache import ScoreCache

        self.lm = lm
        self.scores = cache if cache is not None else ScoreCache()  # the session's, shared by its classifiers
        self.builder = builder
        self.template = builder.template
        if self.template.task != "classify" or not self.template.labels:
            raise UsageError(f"template '{self.template.name}' is a {self.template.task} template; "
                             "classify needs one with task: classify and labels")
        self.labels = list(self.template.labels)
        self.method = method
        self.normalize = normalize
        self.ensemble = ensemble
        self.batch_size = batch_size
        self.settings = settings
        self.on_detail = on_detail  # told each calibration bias (the CLI shows it with --verbose); None: not told
        self._bias: dict[tuple[str | int, ...], list[float]] = {}
        self._domain: list[str] = []  # Fei et al.'s random in-domain texts, made from the items classified
        self.label_tokens = max(len(lm.continuation_ids(" " + v)) for v in self.template.labels.values())
        if self.calibrate == "probe" and probe is None:
            raise UsageError("--calibration probe needs --probe-data FILE: labelled rows to fit the probe on")
        self.probe_source = probe  # llmlab.scoring.probe.Source, or None
        self._probes: dict[int, Probe] = {}  # draw -> fitted probe
        self.hidden_layers: list[int] | None = None
        if probe is not None:
            from llmlab.scoring import probe as probes

            if probe.fitted is not None:  # given fitted: its own model, layers and prompts (checked before scoring)
                probes.check_model(probe, lm.name)
                self.hidden_layers = probes.parse_layers(",".join(map(str, probe.fitted.layers or [])), lm.num_layers)
                probes.check_form(probe, self.prompt_form(0))
            else:
                self.hidden_layers = probes.parse_layers(probe.layers, lm.num_layers)

    def _continuations(self, prompt: Prompt) -> list[str]:
        return [prompt.answer_prefix + self.template.verbalize(label) for label in self.labels]

    def _score(self, prompts: Sequence[Prompt]) -> list[Scores]:
        """(label probabilities, label log-probabilities, hidden states or None) for each prompt.
        Scores are remembered in self.scores (the session's ScoreCache), so eval's calibration methods
        (which differ only after scoring) and repeated content-free prompts score each prompt once.
        With a probe source, the states of self.hidden_layers at the answer position come too."""
        from llmlab.backends.models import LLRequest

        layers = self.hidden_layers
        keys: list[Hashable] = [(p.text, p.chat, tuple(self._continuations(p)), self.normalize) for p in prompts]
        found: dict[Hashable, Scores] = {}
        for key in keys:
            if (entry := self.scores.get(key)) is not None:
                found[key] = entry
        todo = [(key, p) for key, p in dict(zip(keys, prompts)).items()
                if key not in found or (layers and found[key][2] is None)]
        requests = [LLRequest(p.text, c, p.chat, prefix=p.prefix, context_ids=p.ids)
                    for _, p in todo for c in self._continuations(p)]
        outputs = self.lm.loglikelihood(requests, batch_size=self.batch_size, hidden_layers=layers) if requests else []
        k = len(self.labels)
        for n, (key, _) in enumerate(todo):
            outs = outputs[n * k : (n + 1) * k]
            logprobs = [o.logprob for o in outs]
            scores = [o.logprob / o.tokens for o in outs] if self.normalize == "length" else logprobs
            found[key] = (softmax(scores), logprobs, outs[0].hidden)  # one state per prompt: every label's is the same
            self.scores.put(key, found[key])
        return [found[key] for key in keys]

    def probe(self, draw: int) -> Probe:
        """The probe for demonstration draw `draw`: fitted on the probe rows' states under that
        draw's demonstrations (or loaded from the cache when they were fitted before)."""
        from llmlab.scoring import probe as probes

        if draw in self._probes:
            return self._probes[draw]
        source, layers = self.probe_source, self.hidden_layers
        if source is not None and source.fitted is not None:  # given fitted: the same for every draw
            probes.check_form(source, self.prompt_form(draw))
            self._probes[draw] = source.fitted
            if self.on_detail is not None:
                self.on_detail(f"probe (draw {draw}): fitted on {source.fitted.rows} rows, read from {source.path}")
            return source.fitted
        if source is None or layers is None:
            raise UsageError("--calibration probe needs --probe-data FILE: labelled rows to fit the probe on")
        target = self.template.target or ""  # probe.load_source refuses a template without one
        gold = [str(item.fields[target]) for item in source.items]
        prompts = self._prompts(source.items, draw)
        name = probes.key(self.lm.name, layers, [p.text for p in prompts], gold)

        def states() -> list[NDArray[np.float32]]:
            where = ", ".join(map(str, layers))
            source.info(f"fitting the probe: {len(prompts)} rows of {source.path}, layers {where} (once; then cached)")
            out: list[NDArray[np.float32]] = []
            with contextlib.ExitStack() as stack:
                bar = stack.enter_context(source.progress(len(prompts), "probe rows")) if source.progress else None
                for start in range(0, len(prompts), 64):
                    for _, _, h in self._score(prompts[start : start + 64]):
                        assert h is not None  # scored with hidden_layers
                        out.append(h)
                    if bar is not None:
                        bar.advance(len(prompts[start : start + 64]))
            return out

        fitted, cached = probes.load_or_fit(name, states, gold, self.labels)
        self._probes[draw] = fitted
        if self.on_detail is not None:
            self.on_detail(f"probe (draw {draw}): {fitted.rows} rows, layers {self.hidden_layers}, C {fitted.c}, "
                           f"train accuracy {fitted.train_accuracy:.1%}, prompt form {self.prompt_form(draw)}"
                           f"{' (cached)' if cached else ''}")
        return fitted

    def bias(self, shots: list[int], mode: str = "contextual") -> list[float]:
        """b: the mean label probabilities of the content-free inputs of `mode` (contextual: "N/A",
        "", "[MASK]"; domain: random in-domain texts) under these demonstrations."""
        key: tuple[str | int, ...] = (mode, *shots)
        if key not in self._bias:
            texts = CONTENT_FREE if mode == "contextual" else self._domain
            prompts = []
            for text in texts:
                values: dict[str, JSONValue] = {f: text for f in self.template.fields}
                prompts.append(self.builder.build(Item(-1, values, f"content-free input {text!r}"),
                                                  self.label_tokens, shots=list(shots)))
            probs = [p for p, _, _ in self._score(prompts)]
            self._bias[key] = [sum(col) / len(col) for col in zip(*probs)]
            self._show_bias(f"{mode} calibration bias p_cf (shots {list(shots)})", self._bias[key])
        return self._bias[key]

    def _show_bias(self, what: str, bias: Sequence[float]) -> None:
        if self.on_detail is not None:
            self.on_detail(f"{what}: " + ", ".join(f"{label} {p:.3f}" for label, p in zip(self.labels, bias)))

    def classify(self, items: Sequence[Item], on_result: Callable[[Classification], None] | None = None,
                 chunk: int = 64) -> list[Classification]:
        """Classify in chunks (growing to `chunk`: the first results come after one item, not after a
        whole chunk); on_result gets each result as soon as its chunk is done (with batch
        calibration, once every item is scored: the bias is their mean)."""
        if self.calibrate == "domain":
            self._domain = domain_texts(items, self.template.fields, self.builder.options.seed)
            self._bias = {k: v for k, v in self._bias.items() if k[0] != "domain"}
        results: list[Classification] = []
        scored: list[tuple[Item, list[Draw]]] = []  # batch calibration: held until every item is scored

        def emit(done: list[Classification]) -> None:
            for result in done:
                results.append(result)
                if on_result:
                    on_result(result)

        for start, end in chunk_bounds(len(items), chunk):
            part = items[start:end]
            if self.method == "generate":
                prompts = self._prompts(part, 0)
                emit(self._by_generation(part, prompts))
                continue
            draws = self._scored_draws(part)
            if self.calibrate == "batch":
                scored += draws
            else:
                emit([self._combine(item, runs) for item, runs in draws])
        if scored:
            biases = [[sum(col) / len(col) for col in zip(*(runs[d][1] for _, runs in scored))]
                      for d in range(self.ensemble)]
            for d, b in enumerate(biases):
                self._show_bias(f"batch calibration bias (draw {d})", b)
            emit([self._combine(item, runs, biases) for item, runs in scored])
        return results

    def prompt_form(self, draw: int) -> str:
        """A hash of the prompt built around an input whose fields are placeholders, under draw `draw`:
        instruction, demonstrations, format, label words, chat. A fitted probe read states of one form."""
        import hashlib

        item = Item(-1, {f: f"{{{f}}}" for f in self.template.fields}, "the prompts' form")
        prompt = self.builder.build(item, self.label_tokens, draw=draw)
        text = "\x00".join([str(prompt.chat), prompt.text, *self._continuations(prompt)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _prompts(self, part: Sequence[Item], draw: int) -> list[Prompt]:
        if hasattr(self.builder, "prepare"):
            self.builder.prepare(part)  # similar selection: retrieve for the whole chunk at once
        prompts = [self.builder.build(item, self.label_tokens, draw=draw) for item in part]
        for prompt in prompts:
            for note in prompt.notes:
                self.builder.on_warn(note)
        return prompts

    def _scored_draws(self, part: Sequence[Item]) -> list[tuple[Item, list[Draw]]]:
        """Each item with its (prompt, probabilities, log-probabilities, hidden) per demonstration draw.
        All draws are scored in one call, so each draw's shared prefix is still encoded once."""
        prompts = [p for d in range(self.ensemble) for p in self._prompts(part, d)]
        scores = self._score(prompts)
        n = len(part)
        return [(item, [(prompts[d * n + i], *scores[d * n + i]) for d in range(self.ensemble)])
                for i, item in enumerate(part)]

    def _combine(self, item: Item, runs: list[Draw],
                 batch_bias: Sequence[list[float]] = ()) -> Classification:
        """Calibrate each draw's probabilities by its own bias (or read them with its own probe),
        then average over draws (--ensemble)."""
        raws, finals = [], []
        for d, (prompt, probs, _, hidden) in enumerate(runs):
            raws.append(probs)
            if self.calibrate == "off":
                finals.append(probs)
            elif self.calibrate == "probe":
                assert hidden is not None  # a probe's scoring asks for the hidden states (self.hidden_layers)
                finals.append(self.probe(d).predict([hidden])[0])
            elif self.calibrate == "batch":
                finals.append(calibrate(probs, batch_bias[d]))
            else:
                finals.append(calibrate(probs, self.bias(prompt.shots, self.calibrate)))
        mean = [sum(col) / len(col) for col in zip(*finals)]
        raw = [sum(col) / len(col) for col in zip(*raws)]
        logprobs = [sum(col) / len(col) for col in zip(*(lp for _, _, lp, _ in runs))]
        best = max(range(len(mean)), key=mean.__getitem__)
        prompt = runs[0][0]
        return Classification(
            item, self.labels[best], dict(zip(self.labels, mean)), prompt.tokens, len(prompt.shots),
            dict(zip(self.labels, raw)) if self.calibrate != "off" or self.ensemble > 1 else None,
            logprobs=dict(zip(self.labels, logprobs)), prompt=prompt.text,
        )

    def _by_generation(self, items: Sequence[Item], prompts: Sequence[Prompt]) -> list[Classification]:
        from llmlab.backends.models import GenRequest
        from llmlab.core.settings import GenerationSettings

        outputs = self.lm.generate([GenRequest(p.text, p.chat) for p in prompts], self.settings or GenerationSettings(),
                                   batch_size=self.batch_size)
        out = []
        for item, prompt, output in zip(items, prompts, outputs):
            text = output.completions[0]
            label = label_from_text(text, self.template.labels)
            probs = {lab: float(lab == label) for lab in self.labels}
            out.append(Classification(item, label, probs, prompt.tokens, len(prompt.shots), completion=text,
                                      prompt=prompt.text))
        return out


def record(result: Classification, template: Template, model_name: str) -> dict[str, object]:
    rec: dict[str, object] = {"index": result.item.index, **result.item.fields, "prediction": result.prediction}
    gold = result.item.fields.get(template.target) if template.target else None
    if gold is not None:  # a null label means unlabeled: no `correct`, never a comparison with "None"
        rec["correct"] = result.prediction == str(gold)
    rec["probabilities"] = {k: round(v, 6) for k, v in result.probabilities.items()}
    if result.raw_probabilities is not None:
        rec["raw_probabilities"] = {k: round(v, 6) for k, v in result.raw_probabilities.items()}
    if result.completion is not None:
        rec["completion"] = result.completion
    rec["prompt_tokens"] = result.prompt_tokens
    rec["shots"] = result.shots
    rec["model"] = model_name
    return rec


def run_metrics(results: Sequence[Classified], template: Template) -> ClassifyMetrics:
    """The run log's metrics of a classify run: items, and accuracy over the labeled ones."""
    golds = [(r.prediction, str(r.item.fields[template.target])) for r in results
             if template.target and r.item.fields.get(template.target) is not None]
    metrics: ClassifyMetrics = {"items": len(results)}
    if golds:
        metrics["accuracy"] = sum(p == g for p, g in golds) / len(golds)
        metrics["labeled"] = len(golds)
    return metrics
