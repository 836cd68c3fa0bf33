"""Successive halving over growing mini-batches, and the scorer it calls.

The scorer runs each variant through the ordinary scoring path: a template (space.apply), the
session's PromptBuilder and classify.Classifier (whose per-model score memo and the backend's prefix
KV cache make re-reading a variant's earlier rows free), or the generation jobs of `eval` for
generate templates. A row's score is 1/0 (right/wrong label) or its ROUGE-L F-measure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from llmlab.core.config import PromptConfig
from llmlab.core.errors import UsageError
from llmlab.optimizing import space as spaces

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.io.items import Item
    from llmlab.orchestration.session import Session
    from llmlab.prompting.prompts import PromptBuilder
    from llmlab.prompting.templates import Template
    from llmlab.scoring.classify import Classifier
    from llmlab.scoring.probe import Probe, Source


@dataclass
class Rung:
    """One round: `count` variants each scored on the first `rows` search rows."""

    count: int
    rows: int


def plan(count: int, rows: int, budget: int, fixed: int = 0) -> list[Rung] | None:
    """The rungs that spend the most of `budget` scored items (variant x new row; `fixed` is spent
    anyway): the first rung's rows doubled each round while the variants are halved (rounded up)
    until one is left, rows capped at `rows`. None when not even one row per variant fits."""
    for first in range(rows, 0, -1):
        rungs, alive, n, spent, before = [], count, first, fixed, 0
        while alive > 1:
            n_rows = min(n, rows)
            spent += alive * (n_rows - before)
            rungs.append(Rung(alive, n_rows))
            alive, n, before = math.ceil(alive / 2), n * 2, n_rows
        if spent <= budget:
            return rungs
    return None


def cost(rungs: Sequence[Rung], fixed: int = 0) -> int:
    before, spent = 0, fixed
    for r in rungs:
        spent += r.count * (r.rows - before)
        before = r.rows
    return spent


@dataclass
class Scores:
    """A variant's per-row scores and, for classify, the gold label's probability (the tie-break)."""

    values: list[float] = field(default_factory=list)
    gold_probability: list[float] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # the exact text the model saw per row

    def mean(self, n: int | None = None) -> tuple[float, float]:
        v, g = self.values[:n], self.gold_probability[:n]
        return (sum(v) / len(v) if v else 0.0, sum(g) / len(g) if g else 0.0)


class Scorer:
    """Scores variants of one template on rows through the session; counts scored items."""

    def __init__(self, session: Session, space: spaces.Space, batch_size: int, probe: Source | None = None,
                 references: Sequence[str] = (), data_probe: Source | None = None):
        from llmlab.orchestration.session import settings_for

        self.session, self.space, self.batch_size, self.probe = session, space, batch_size, probe
        self.data_probe = data_probe  # probe.Source of the search rows set aside for the "probe data" readout
        self.references = list(references)
        self.settings = settings_for(space.template)
        self.spent = 0  # scored items: variant x row, plus probe rows fitted
        self._classifiers: dict[spaces.Variant, Classifier] = {}
        self._generated: dict[tuple[spaces.Variant, str, int], tuple[str, str]] = {}  # (variant, row) -> (prompt, completion)

    def _builder(self, template: Template) -> PromptBuilder:
        return self.session.builder(template, PromptConfig(), self.settings.max_new_tokens, None)

    def classifier(self, v: spaces.Variant) -> Classifier:
        from llmlab.scoring import classify

        if v not in self._classifiers:
            template = spaces.apply(self.space, v)
            probe = {"probe": self.probe, spaces.DATA_PROBE: self.data_probe}.get(v.readout)
            self._classifiers[v] = classify.Classifier(self.session.lm, self._builder(template), "score", "none",
                                                       spaces.calibration(v), self.batch_size, self.settings, 1,
                                                       None, probe, cache=self.session.scores)
            if probe is not None:
                self._classifiers[v].probe(0)
                self.spent += len(probe.items)
        return self._classifiers[v]

    def fitted_probe(self, v: spaces.Variant) -> Probe:
        """The probe variant `v` reads (draw 0's), marked with the model and layers it reads, to be
        written as a file a template names."""
        classifier = self.classifier(v)
        return dataclasses.replace(classifier.probe(0), model=self.session.lm.name,
                                   layers=list(classifier.hidden_layers or []), prompt_form=classifier.prompt_form(0))

    def score(self, v: spaces.Variant, items: Sequence[Item], new: int) -> Scores:
        """Scores of `v` on `items`, of which the last `new` were not scored for it before."""
        self.spent += new
        if self.space.template.task == "classify":
            return self._classify(v, items)
        return self._generate(v, items)

    def _classify(self, v: spaces.Variant, items: Sequence[Item]) -> Scores:
        target = self.space.template.target or ""  # a classify template has one (the loader checks)
        out = Scores()
        for r in self.classifier(v).classify(items, chunk=2 * self.batch_size):
            gold = str(r.item.fields[target])
            out.values.append(float(r.prediction == gold))
            out.gold_probability.append(r.probabilities[gold])
            out.prompts.append(r.prompt)
        return out

    def _generate(self, v: spaces.Variant, items: Sequence[Item]) -> Scores:
        from llmlab.orchestration.session import run_jobs
        from llmlab.scoring import generation, metrics

        todo = [i for i in items if (v, i.source, i.index) not in self._generated]
        if todo:
            jobs = generation.template_jobs(self._builder(spaces.apply(self.space, v)), todo)
            for job, o in zip(jobs, run_jobs(self.session.lm, jobs, self.settings, self.batch_size, lambda j, o: None)):
                self._generated[(v, job.item.source, job.item.index)] = (job.model_text, o.completions[0].strip())
        out = Scores()
        texts = [self._generated[(v, i.source, i.index)] for i in items]
        refs = [[str(i.fields[f]) for f in self.references] for i in items]
        out.values = metrics.rouge_l([t for _, t in texts], refs)
        out.gold_probability = [0.0] * len(items)
        out.prompts = [p for p, _ in texts]
        return out


@dataclass
class Step:
    """One rung of the trajectory: each variant's (index, mean score) on `rows` rows, best first."""

    rung: int
    rows: int
    ranked: list[tuple[int, float]]
    kept: int


def halve(candidates: Sequence[spaces.Variant], rows: Sequence[Item], rungs: Sequence[Rung], scorer: Scorer,
          on_step: Callable[[Step], None] = lambda step: None,
          on_scored: Callable[[int], None] = lambda n: None,
          stop: Callable[[int], bool] = lambda items: False) -> tuple[int, list[Step], dict[int, Scores]]:
    """Successive halving: each rung scores the variants still in on the first rung.rows rows and
    keeps the better half (ties: the gold label's mean probability, then the earlier candidate).
    stop(the rung's new scored items) is asked before each rung after the first: True ends the search
    there (the best of the last rung wins). Returns (the winner's index, the trajectory, each
    variant's last scores)."""
    alive, steps, last = list(range(len(candidates))), [], {}
    done: dict[int, int] = {}  # candidate -> rows scored so far
    for n, rung in enumerate(rungs):
        if n and stop(sum(rung.rows - done.get(i, 0) for i in alive)):
            break
        if rung.count != len(alive):
            raise UsageError(f"internal: rung {n} plans {rung.count} variants, {len(alive)} are left")
        for i in alive:
            last[i] = scorer.score(candidates[i], rows[: rung.rows], rung.rows - done.get(i, 0))
            on_scored(rung.rows - done.get(i, 0))
            done[i] = rung.rows
        ranked = sorted(alive, key=lambda i: (-last[i].mean()[0], -last[i].mean()[1], i))
        alive = ranked[: math.ceil(len(ranked) / 2)]
        steps.append(Step(n, rung.rows, [(i, last[i].mean()[0]) for i in ranked], len(alive)))
        on_step(steps[-1])
    return alive[0], steps, last
