"""`llmlab optimize`: search a template's prompt variants on one part of the data, then measure the
start template and the winner once on the other part (the held-out rows, untouched until then) and
compare them on the same rows with a paired interval and test (llmlab.scoring.stats).

Layer: optimizing sits between commands and learn/orchestration; it drives a Session and scores
through classify.Classifier / the generation jobs, never a loop of its own.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from llmlab.core.config import OptimizeConfig
from llmlab.core.errors import DataError, TemplateError, UsageError
from llmlab.core.jsontypes import JSONObject
from llmlab.optimizing import budget as budgets
from llmlab.optimizing import search as searching
from llmlab.optimizing import space as spaces

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM
    from llmlab.io.items import Item
    from llmlab.orchestration.session import Hooks, Session
    from llmlab.prompting.templates import Template
    from llmlab.scoring.probe import Source
    from llmlab.scoring.stats import Difference

MIN_SEARCH, MIN_HELD = 4, 2
POOL_FROM_DATA = 16  # rows set aside as demonstrations when the template has no examples
PROPOSER = ("Here are examples of a task.\n\n{examples}\n\nWrite one short sentence telling a reader how to do "
            "this task{labels}. Reply with the sentence only.")


@dataclass
class Result:
    template: str
    output: str
    task: str
    metric: str  # accuracy or ROUGE-L
    search_rows: int
    held_rows: int
    budget: int
    spent: int  # scored items in the search
    candidates: int
    proposals: list[str]
    winner: str  # what the winner changes
    start_search: tuple[float, int]  # (mean score, rows) of the start template in the search
    winner_search: tuple[float, int]
    difference: Difference  # start (a) vs winner (b) on the held-out rows
    seconds: float
    trajectory: list[searching.Step] = field(default_factory=list)
    search_seconds: float = 0.0  # the search's wall time (proposals included, held-out rows not)
    budget_seconds: float = 0.0  # --budget as a time (0: as scored items)
    prompts: list[str] = field(default_factory=list)  # the winner's held-out prompts, in row order


def check(cfg: OptimizeConfig) -> None:
    """The options, checked before anything is read or loaded."""
    from llmlab.io.records import check_output_path

    if cfg.budget < 1 and not cfg.budget_seconds:
        raise UsageError(f"invalid --budget {cfg.budget}: give the scored items the search may spend, e.g. "
                         "--budget 2000")
    if not 0 < cfg.holdout < 1:
        raise UsageError(f"invalid --holdout {cfg.holdout}: the held-out share of --data, between 0 and 1")
    if cfg.candidates < 2:
        raise UsageError(f"invalid --candidates {cfg.candidates}: the search needs at least 2")
    if cfg.proposals < 0:
        raise UsageError(f"invalid --proposals {cfg.proposals}: must be >= 0")
    if cfg.proposer is not None and not cfg.proposals:
        raise UsageError("--proposer writes the --proposals instructions, and --proposals is 0: give --proposals N "
                         "(e.g. 4), or leave --proposer out")
    if cfg.probe_rows < 0 or cfg.probe_rows == 1:
        raise UsageError(f"invalid --probe-rows {cfg.probe_rows}: 0 (none) or at least 2 search rows for a probe")
    if Path(cfg.output).suffix not in (".yaml", ".yml"):
        raise UsageError(f"-o '{cfg.output}': the optimised template is written as YAML; name a .yaml file")
    if cfg.test is not None and Path(cfg.test).resolve() == Path(cfg.data).resolve():
        raise UsageError("--test is the --data file itself: held-out rows must not be searched on; give another "
                         "file, or leave --test out to hold out part of --data")
    check_output_path(cfg.output, "-o", inputs=[cfg.data, cfg.test])


def split(items: Sequence[Item], held: Sequence[Item] | None, share: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(search rows in the seeded order the mini-batches take them, held-out rows in file order)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if held is None:
        n = round(len(order) * share)
        held, order = sorted(order[:n], key=lambda i: i.index), order[n:]
    if len(order) < MIN_SEARCH or len(held) < MIN_HELD:
        raise DataError(f"too few rows to split: {len(order)} to search and {len(held)} held out (need at least "
                        f"{MIN_SEARCH} and {MIN_HELD}); give more rows, or --test FILE for the held-out rows")
    return order, list(held)


def read(cfg: OptimizeConfig, template: Template) -> tuple[list[Item], list[Item], list[str]]:
    """(search rows, held-out rows, reference fields), every row checked against the template."""
    from llmlab.orchestration import evalplan
    from llmlab.orchestration.session import read_input

    items = read_input(cfg.data, "auto", template.fields[0], cfg.offset, cfg.limit)
    refs = evalplan.check_data(items, template, [])
    held = None
    if cfg.test is not None:
        held = read_input(cfg.test, "auto", template.fields[0])
        evalplan.check_data(held, template, refs)
    search, held = split(items, held, cfg.holdout, cfg.seed)
    return search, held, refs


def pool_for(cfg: OptimizeConfig, template: Template, search: list[Item]) -> tuple[list[JSONObject], list[Item]]:
    """(demonstration pool, search rows left): --examples, the template's examples, else a few
    search rows set aside (never scored in the search)."""
    from llmlab.prompting.prompts import check_examples, load_examples

    if cfg.examples:
        pool = load_examples(cfg.examples)
        check_examples(template, pool, cfg.examples)
        return pool, search
    if template.examples or not template.target or len(search) < MIN_SEARCH + 4:
        return list(template.examples), search
    n = min(POOL_FROM_DATA, len(search) // 4)
    return [dict(i.fields) for i in search[:n]], search[n:]


def data_probe(cfg: OptimizeConfig, template: Template, search: list[Item]) -> tuple[Source | None, list[Item]]:
    """(a probe.Source of the first --probe-rows search rows, the search rows left): the rows the
    "probe data" readout is fitted on, never scored in the search; (None, search) without --probe-rows."""
    from llmlab.scoring import probe as probes

    if not cfg.probe_rows:
        return None, search
    if template.task != "classify" or not template.target:
        raise UsageError(f"--probe-rows needs a classify template with a target; '{template.name}' has none")
    if len(search) < cfg.probe_rows + MIN_SEARCH:
        raise DataError(f"--probe-rows {cfg.probe_rows}: the search has {len(search)} rows, and needs "
                        f"{MIN_SEARCH} more than the probe's; give more rows or fewer --probe-rows")
    rows = search[: cfg.probe_rows]
    if {str(i.fields[template.target]) for i in rows} != set(template.labels):
        raise DataError(f"the {cfg.probe_rows} --probe-rows rows do not hold every label; give more --probe-rows")
    return probes.Source(rows, None, f"{cfg.probe_rows} search rows"), search[cfg.probe_rows:]


def _fixed(variants: Sequence[spaces.Variant], probe_rows: int, data_rows: int) -> int:
    """Scored items spent on probe fits: each probe variant fits its own probe."""
    return sum(probe_rows if v.readout == "probe" else data_rows if v.readout == spaces.DATA_PROBE else 0
               for v in variants)


def schedule(space: spaces.Space, cfg: OptimizeConfig, rows: int, probe_rows: int, data_rows: int = 0
             ) -> tuple[list[spaces.Variant], list[searching.Rung]]:
    """The candidates and rungs that fit --budget. When they don't, the variants that would fit a probe
    of their own (each costs all the probe rows) give way to variants without one, then the last go."""
    variants = spaces.candidates(space, cfg.candidates, cfg.seed)
    spare = [v for v in spaces.candidates(space, 4 * cfg.candidates, cfg.seed + 1)
             if v not in variants and not v.readout.startswith("probe")]  # stand-ins for dropped probe variants
    while len(variants) > 1:
        fixed = _fixed(variants, probe_rows, data_rows)
        rungs = searching.plan(len(variants), rows, cfg.budget, fixed)
        if rungs is not None:
            return variants, rungs
        probes = [n for n, v in enumerate(variants) if n and v.readout.startswith("probe")]
        if probes:
            del variants[probes[-1]]
            variants += spare[:1]
            spare = spare[1:]
        else:
            variants.pop()
    variants = spaces.candidates(space, 2, cfg.seed)
    fixed = _fixed(variants, probe_rows, data_rows)
    raise UsageError(f"--budget {cfg.budget} is too small: two variants on one row each need {2 + fixed} "
                     "scored items; raise --budget")


def propose(session: Session, template: Template, pool: Sequence[Mapping[str, object]], count: int,
            seed: int) -> list[str]:
    """Instructions the loaded model writes from a few demonstrations (greedy, one line each)."""
    from llmlab.backends.models import GenRequest
    from llmlab.orchestration.session import chat_for, settings_for
    from llmlab.prompting.templates import fill

    if not count or not pool or not template.target:
        return []
    lm = session.lm
    chat = chat_for(lm.tokenizer, None)
    words = f" (the answer is one of: {', '.join(template.labels.values())})" if template.labels else ""
    requests = []
    for n in range(count):
        rows = random.Random(seed * 100 + n).sample(list(pool), min(3, len(pool)))
        shown = "\n\n".join(fill(template.input, r, "example") + template.answer_prefix + template.verbalize(
            r[template.target]) for r in rows)
        text = PROPOSER.format(examples=shown, labels=words)
        if chat:
            text = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
        requests.append(GenRequest(text, chat))
    outputs = lm.generate(requests, settings_for(None, None, {"max_new_tokens": 48, "do_sample": False}))
    found: list[str] = []
    for out in outputs:
        line = next((s.strip() for s in out.completions[0].splitlines() if s.strip()), "")
        line = line.removeprefix("Instruction:").strip().strip('"').strip()
        if 8 <= len(line) <= 300 and line not in found:
            found.append(line)
    return found


def _proposals(cfg: OptimizeConfig, session: Session, template: Template, pool: Sequence[JSONObject], hooks: Hooks,
               proposer_lm: LM | None = None) -> list[str]:
    """The instructions the searched model writes, or the --proposer model (loaded through the same
    session road, used for this and let go before the search)."""
    from llmlab.orchestration.session import Session

    writer_session = session
    if cfg.proposer is not None and cfg.proposals and pool and template.target:
        writer_session = Session(cfg.proposer, proposer_lm, hooks)
        hooks.info(f"proposer: {writer_session.lm.name}")
    proposed = propose(writer_session, template, pool, cfg.proposals, cfg.seed)
    for n, text in enumerate(proposed, 1):
        hooks.info(f"proposed instruction {n}: {text}")
    return proposed


def lineage(cfg: OptimizeConfig, template: Template, r: Result) -> list[str]:
    d = r.difference
    pct = (lambda x: f"{x:.1%}") if r.task == "classify" else (lambda x: f"{x:.4f}")
    return [
        f"Written by llmlab optimize from template '{template.name}' ({template.path}), seed {cfg.seed},",
        f"budget {budgets.shown(r.budget, r.budget_seconds)} ({r.spent} scored items spent), "
        f"{r.candidates} variants, search {r.search_rows} rows of "
        f"{cfg.data},",
        f"held-out {r.held_rows} rows ({cfg.test or f'{cfg.holdout:g} of --data'}). Change: {r.winner}.",
        *([f"Instructions proposed by {cfg.proposer.spec}."] if cfg.proposer is not None and r.proposals else []),
        f"Held-out {r.metric}: start {pct(d.a)}, this {pct(d.b)}, difference {d.diff * 100:+.1f} points, 95% paired "
        f"bootstrap CI [{d.low * 100:+.1f}, {d.high * 100:+.1f}], {d.test} p = {d.p:.3g}: {d.verdict()}.",
        f"Search {r.metric} of this variant: {pct(r.winner_search[0])} on {r.winner_search[1]} rows.",
    ]


def optimize(cfg: OptimizeConfig, hooks: Hooks | None = None, lm: LM | None = None,
             clock: Callable[[], float] = time.monotonic, proposer_lm: LM | None = None) -> Result:
    """Check, split, search within the budget, score start and winner once on the held-out rows,
    write the winner; returns the result for the table."""
    from llmlab.orchestration.session import Hooks, find_template
    from llmlab.core.config import PromptConfig

    hooks = hooks or Hooks()
    check(cfg)
    template = find_template(PromptConfig(cfg.template, prompts_dir=cfg.prompts_dir))
    if template is None:
        raise UsageError("optimize needs a template: -t NAME or a .yaml path")
    if template.task == "classify" and not template.labels:
        raise TemplateError(f"template '{template.name}' has no labels: a classify search needs them")
    search, held, refs = read(cfg, template)
    pool, search = pool_for(cfg, template, search)
    fitted, search = data_probe(cfg, template, search)
    if fitted is not None:
        fitted.progress, fitted.info = hooks.progress, hooks.note
    sidecar = Path(cfg.output).with_suffix(".probe.jsonl").resolve() if fitted is not None else None
    probe = _probe(template, hooks)
    probe_rows = len(probe.items) if probe is not None else 0
    if not cfg.budget_seconds:  # the budget fits: before the model
        schedule(spaces.make_space(template, pool, (), sidecar), cfg, len(search), probe_rows, cfg.probe_rows)
    with hooks.open_run("optimize", config=_logged(cfg), templates=template, data=cfg.data) as log:
        from llmlab.orchestration.session import loaded

        started = clock()
        session = loaded(cfg.model, lm, log, hooks)
        began = clock()  # the search's time starts here
        proposed = _proposals(cfg, session, template, pool, hooks, proposer_lm)
        space = spaces.make_space(template, pool, proposed, sidecar)
        scorer = searching.Scorer(session, space, cfg.batch_size, probe, refs, fitted)
        if cfg.budget_seconds:
            cfg = dataclasses.replace(cfg, budget=budgets.items_in(cfg.budget_seconds, space.start(), search, scorer,
                                                                   clock, began))
            hooks.info(f"--budget {budgets.shown(0, cfg.budget_seconds)}: about {cfg.budget} scored items")
        variants, rungs = schedule(space, cfg, len(search), probe_rows, cfg.probe_rows)
        winner, steps, last = _search(variants, search, rungs, scorer, hooks, _deadline(cfg, scorer, clock, began))
        spent, searched = scorer.spent, clock() - began
        start_held, win_held = _held_out(scorer, variants[0], variants[winner], held, hooks)
        result = _result(cfg, template, space, variants, winner, last, start_held, win_held, steps, proposed,
                         len(search), len(held), spent, clock() - started, searched)
        from llmlab.optimizing import writer

        chosen, story = spaces.apply(space, variants[winner]), lineage(cfg, template, result)
        if variants[winner].readout == spaces.DATA_PROBE and fitted is not None:
            # the probe as fitted (no rows in it), and its rows beside it to refit one for another model
            writer.write_rows(fitted.items, space.data_probe)
            chosen = writer.with_fitted(chosen, scorer.fitted_probe(variants[winner]), cfg.output)
            story.append(f"Its probe: {Path(cfg.output).with_suffix('.probe.npz').name}, fitted on "
                         f"{len(fitted.items)} search rows ({Path(cfg.output).with_suffix('.probe.jsonl').name}) "
                         f"for {session.lm.name}; for another model: --probe-data with those rows.")
        written = writer.beside(chosen, cfg.output)
        writer.write(written, cfg.output, story)
        log.metrics(_metrics(result))
    return result


def _probe(template: Template, hooks: Hooks) -> Source | None:
    """The template's probe rows (read, not fitted) when it names some: the probe readout's data."""
    from llmlab.orchestration.session import probe_source

    if template.task != "classify" or template.probe_path is None:
        return None
    return probe_source(None, "probe", template, hooks)


def _logged(cfg: OptimizeConfig) -> dict[str, object]:
    import dataclasses

    return dataclasses.asdict(cfg)


def _deadline(cfg: OptimizeConfig, scorer: searching.Scorer, clock: Callable[[], float], began: float
              ) -> Callable[[int], bool]:
    """With --budget as a time: stop(items) is True when a rung of `items` new scored items, at the
    rate the search has run so far, would end after the deadline."""
    def stop(items: int) -> bool:
        now = clock()
        rate = scorer.spent / max(now - began, 1e-9)
        return bool(cfg.budget_seconds) and now + items / max(rate, 1e-9) > began + cfg.budget_seconds

    return stop


def _search(variants: list[spaces.Variant], rows: list[Item], rungs: list[searching.Rung], scorer: searching.Scorer,
            hooks: Hooks, stop: Callable[[int], bool]) -> tuple[int, list[searching.Step], dict[int, searching.Scores]]:
    """Successive halving with a progress bar over the planned scored items and one line per rung;
    stop(items) before a rung: the time is up."""
    metric = "accuracy" if scorer.space.template.task == "classify" else "ROUGE-L"
    base = variants[0]

    def told(step: searching.Step) -> None:
        best, score = step.ranked[0]
        hooks.info(f"round {step.rung + 1}: {len(step.ranked)} variants on {step.rows} rows, {step.kept} kept; "
                   f"best {metric} {score:.3f}: {variants[best].describe(base)}")

    with hooks.progress(searching.cost(rungs), "searching") as bar:
        found = searching.halve(variants, rows, rungs, scorer, told, bar.advance, stop)
    if len(found[1]) < len(rungs):
        hooks.info(f"time is up: {len(found[1])} of {len(rungs)} rounds run; the last round's best wins")
    return found


def _held_out(scorer: searching.Scorer, start: spaces.Variant, winner: spaces.Variant, held: list[Item],
              hooks: Hooks) -> tuple[searching.Scores, searching.Scores]:
    """The start template's and the winner's scores on the held-out rows: each scored once, here."""
    with hooks.progress(len(held) * (1 if winner == start else 2), "held-out") as bar:
        a = scorer.score(start, held, len(held))
        bar.advance(len(held))
        if winner == start:
            return a, a
        b = scorer.score(winner, held, len(held))
        bar.advance(len(held))
    return a, b


def _result(cfg: OptimizeConfig, template: Template, space: spaces.Space, variants: list[spaces.Variant], winner: int,
            last: dict[int, searching.Scores], start_held: searching.Scores, win_held: searching.Scores,
            steps: list[searching.Step], proposed: list[str], n_search: int, n_held: int, spent: int,
            seconds: float, searched: float) -> Result:
    from llmlab.scoring import stats

    base = variants[0]
    return Result(
        template=template.name, output=cfg.output, task=template.task,
        metric="accuracy" if template.task == "classify" else "ROUGE-L", search_rows=n_search, held_rows=n_held,
        budget=cfg.budget, spent=spent, candidates=len(variants), proposals=proposed,
        winner=variants[winner].describe(base),
        start_search=(last[0].mean()[0], len(last[0].values)),
        winner_search=(last[winner].mean()[0], len(last[winner].values)),
        difference=stats.compare(start_held.values, win_held.values, seed=cfg.seed, binary=template.task == "classify"),
        seconds=seconds, trajectory=steps, prompts=win_held.prompts, search_seconds=searched,
        budget_seconds=cfg.budget_seconds,
    )


def _metrics(r: Result) -> dict[str, object]:
    """The run log's record of the search: the trajectory and the held-out comparison."""
    import dataclasses

    d = r.difference
    return {"items": r.held_rows, "metric": r.metric, "search_rows": r.search_rows, "held_rows": r.held_rows,
            "budget": r.budget, "spent": r.spent, "candidates": r.candidates, "winner": r.winner,
            "start": d.a, "optimised": d.b, "difference": d.diff, "ci": [d.low, d.high], "p": d.p, "test": d.test,
            "proposals": r.proposals, "seconds": r.seconds, "search_seconds": r.search_seconds,
            "budget_seconds": r.budget_seconds,
            "trajectory": [dataclasses.asdict(s) for s in r.trajectory]}
