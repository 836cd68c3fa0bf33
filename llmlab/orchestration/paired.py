"""`llmlab eval`'s paired differences: every combination against the first one on the same data
(the same rows), with a 95% paired bootstrap interval and a p-value (McNemar's exact test for
right/wrong outcomes with one seed; a paired permutation test for per-row means over seeds and for
ROUGE-L), Holm-corrected over the comparisons of the run."""

from __future__ import annotations

from typing import Final, Sequence

from llmlab.io.evalreport import Paired, Report, Result, SeedRun

KEY: Final = "item_scores"  # each seed's per-row scores, in row order: put in by evaluate, taken out here


def row_scores(run_list: Sequence[SeedRun]) -> list[float]:
    """Each row's score averaged over the seeds (a row is the same input in every seed)."""
    columns: list[tuple[float, ...]] = list(zip(*(run[KEY] for run in run_list)))
    return [sum(c) / len(c) for c in columns]


def differences(results: Sequence[Result], seed: int = 0) -> list[Paired]:
    """One entry per combination after the first of its data: difference (its mean minus the
    baseline's), low, high, p, p_holm, test. The per-row scores are removed from `results`."""
    from llmlab.scoring import stats

    scores = [row_scores(r["runs"]) for r in results]
    for r in results:
        for run in r["runs"]:
            run.pop(KEY, None)
    first: dict[tuple[str, str], int] = {}
    found: list[Paired] = []
    for n, r in enumerate(results):
        group = (r["data"], r["task"])
        if group not in first:
            first[group] = n
            continue
        base = first[group]
        binary = r["task"] == "classify" and len(r["seeds"]) == 1 and len(results[base]["seeds"]) == 1
        d = stats.compare(scores[base], scores[n], seed=seed, binary=binary)
        found.append({"row": n, "baseline": base, "difference": d.diff, "low": d.low, "high": d.high, "p": d.p,
                      "test": d.test, "n": d.n})
    for entry, adjusted in zip(found, stats.holm([float(e["p"]) for e in found])):
        entry["p_holm"] = adjusted
    return found


def label(result: Result) -> str:
    return f"{result['template']} {result['shots']}-shot {result['calibrate']}"


def rows(report: Report) -> list[list[str]]:
    """The short table's rows: combination, baseline, difference and interval in points, Holm p."""
    results = report["results"]
    out = []
    for e in report.get("paired", []):
        out.append([label(results[e["row"]]), label(results[e["baseline"]]), f"{e['difference'] * 100:+.1f}",
                    f"[{e['low'] * 100:+.1f}, {e['high'] * 100:+.1f}]", f"{e['p_holm']:.3g}", e["test"]])
    return out


HEADERS = ["combination", "vs (first on its data)", "diff (points)", "95% paired CI", "p (Holm)", "test"]
