"""Paired differences, one implementation for `llmlab eval` (every combination against the first one
on the same data), `llmlab compare` and `llmlab runs compare` (every column against a baseline
column, on the rows both have): a 95% paired bootstrap interval and a p-value (McNemar's exact test
for right/wrong outcomes with one seed; a paired permutation test for per-row means over seeds and
for ROUGE-L), Holm-corrected over the comparisons shown together."""

from __future__ import annotations

from typing import Callable, Final, Sequence

from llmlab.io.evalreport import Paired, Report, Result, SeedRun

KEY: Final = "item_scores"  # each seed's per-row scores, in row order: put in by evaluate, taken out here
# (row, baseline row, the baseline's per-item scores, the row's on the same items, binary outcomes)
Pair = tuple[int, int, Sequence[float], Sequence[float], bool]


def row_scores(run_list: Sequence[SeedRun]) -> list[float]:
    """Each row's score averaged over the seeds (a row is the same input in every seed)."""
    columns: list[tuple[float, ...]] = list(zip(*(run[KEY] for run in run_list)))
    return [sum(c) / len(c) for c in columns]


def compared(pairs: Sequence[Pair], seed: int = 0) -> list[Paired]:
    """THE paired comparison of eval, compare and runs compare: one entry per pair, the difference
    (row minus baseline), its 95% paired bootstrap interval low/high, p (McNemar's exact test when
    binary, else the paired permutation test), p_holm (Holm-corrected over the pairs), test, n."""
    from llmlab.scoring import stats

    found: list[Paired] = []
    for row, base, a, b, binary in pairs:
        d = stats.compare(a, b, seed=seed, binary=binary)
        found.append({"row": row, "baseline": base, "difference": d.diff, "low": d.low, "high": d.high, "p": d.p,
                      "test": d.test, "n": d.n})
    for entry, adjusted in zip(found, stats.holm([float(e["p"]) for e in found])):
        entry["p_holm"] = adjusted
    return found


def differences(results: Sequence[Result], seed: int = 0) -> list[Paired]:
    """eval: one entry per combination after the first of its data (see compared). The per-row
    scores are removed from `results`."""
    scores = [row_scores(r["runs"]) for r in results]
    for r in results:
        for run in r["runs"]:
            run.pop(KEY, None)
    first: dict[tuple[str, str], int] = {}
    pairs: list[Pair] = []
    for n, r in enumerate(results):
        group = (r["data"], r["task"])
        if group not in first:
            first[group] = n
            continue
        base = first[group]
        binary = r["task"] == "classify" and len(r["seeds"]) == 1 and len(results[base]["seeds"]) == 1
        pairs.append((n, base, scores[base], scores[n], binary))
    return compared(pairs, seed)


def label(result: Result) -> str:
    return f"{result['template']} {result['shots']}-shot {result['calibrate']}"


def rows(report: Report) -> list[list[str]]:
    """eval's short table: combination, baseline, difference and interval in points, Holm p."""
    results = report["results"]
    return cells(report.get("paired", []), lambda n: label(results[n]))


def cells(entries: Sequence[Paired], name: Callable[[int], str]) -> list[list[str]]:
    """A paired table's rows (HEADERS' columns): name(row), name(baseline), difference and interval in
    points, Holm p, test."""
    return [[name(e["row"]), name(e["baseline"]), f"{e['difference'] * 100:+.1f}",
             f"[{e['low'] * 100:+.1f}, {e['high'] * 100:+.1f}]", f"{e['p_holm']:.3g}", e["test"]] for e in entries]


HEADERS = ["combination", "vs (first on its data)", "diff (points)", "95% paired CI", "p (Holm)", "test"]
TITLE = "Paired differences against {} (95% bootstrap CI; p Holm-corrected over these rows)"
