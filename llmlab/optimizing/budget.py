"""`optimize --budget`: scored items (variant x row, probe rows fitted counted too) or a time
("20m", "90s", "1h"). A time becomes items once, from the rate of a pilot: the start template scored
on the first search rows (its probe fitted first when it has one), timed; the rungs are then planned
as for items, in the same deterministic order. The clock is checked again before each rung: a rung
that would start after the deadline is not run, and the last finished rung's best wins."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Sequence

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only
    from llmlab.io.items import Item
    from llmlab.optimizing.search import Scorer
    from llmlab.optimizing.space import Variant

PILOT = 16  # search rows the start template is scored on to time the model
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse(text: str) -> tuple[int, float]:
    """(scored items, seconds): one of them is 0. '2000' -> (2000, 0); '20m' -> (0, 1200)."""
    found = re.fullmatch(r"\s*(\d+)\s*|\s*(\d+(?:\.\d+)?)\s*([smh])\s*", str(text))
    if found is None:
        raise UsageError(f"invalid --budget '{text}': give scored items (e.g. 2000) or a time (e.g. 20m, 90s, 1h)")
    if found.group(1) is not None:
        return int(found.group(1)), 0.0
    seconds = float(found.group(2)) * _UNITS[found.group(3)]
    if seconds <= 0:
        raise UsageError(f"invalid --budget '{text}': the search needs some time, e.g. 20m")
    return 0, seconds


def shown(items: int, seconds: float) -> str:
    """The budget as given: '2000 scored items' or '20m'."""
    if not seconds:
        return f"{items} scored items"
    for unit in ("h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def items_in(seconds: float, start: Variant, rows: Sequence[Item], scorer: Scorer, clock: Callable[[], float],
             began: float) -> int:
    """The scored items `seconds` (counted from `began`) buy at the rate of a pilot: the start variant
    on the first PILOT rows, timed after its probe (if any) is fitted, since a probe may come from the
    cache. The pilot's rows count once: the search re-reads them from the score cache."""
    if scorer.space.template.task == "classify":
        scorer.classifier(start)  # its probe fitted (or loaded) outside the timing
    pilot = list(rows[:PILOT])
    t0 = clock()
    scorer.score(start, pilot, len(pilot))
    rate = len(pilot) / max(clock() - t0, 1e-9)
    scorer.spent -= len(pilot)  # the search counts these rows when its first rung scores them
    return int(round(rate * max(0.0, began + seconds - clock()), 6)) + scorer.spent + len(pilot)
