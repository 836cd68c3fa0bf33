"""One batching path for scoring and generation, modelled on lm-evaluation-harness's `Collator`:
order the inputs (longest first, so the first batch is the largest and an out-of-memory error
shows at once), cut the order into batches by a row count and/or a token budget (and, for scoring,
where the padding saved is worth another forward pass: see cut()), run each batch, put every
result back at its input's position. On out-of-memory the batch is halved and retried.
No torch here: out-of-memory is recognised by the exception's type name and message."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

R = TypeVar("R")
EventSink = Callable[[int, str], None]


# What one more forward pass costs, in tokens, for scoring's cut(): on a CPU a pass of smollm2 costs
# ~60 ms over its tokens' ~2.6 ms each (bigger models pay more per token); a GPU runs tokens almost free.
PASS_TOKENS = {"cpu": 24, "gpu": 512}
# cut() with neither a row limit nor a token budget: rows per batch at most (bounds its work).
_CUT_ROWS = 1024


def _log(level: int, message: str) -> None:
    logging.getLogger("llmlab").log(level, message)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), or a CPU allocator failure raised as RuntimeError."""
    if any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def take(order: Sequence[int], start: int, lengths: Sequence[int], rows: int | None,
         tokens: int | None) -> list[int]:
    """The next batch from order[start:]: at most `rows` rows and at most `tokens` padded tokens
    (rows x longest row). Always at least one row, however long."""
    batch: list[int] = []
    longest = 0
    for i in order[start:]:
        width = max(longest, lengths[i])
        if batch and ((rows is not None and len(batch) >= rows)
                      or (tokens is not None and width * (len(batch) + 1) > tokens)):
            break
        batch.append(i)
        longest = width
    return batch


def cut(order: Sequence[int], lengths: Sequence[int], rows: int | None, tokens: int | None,
        overhead: int) -> list[list[int]]:
    """order (longest first) cut into consecutive batches that cost the least, a batch costing its
    padded tokens (rows x its first row's length) plus `overhead`, the price of one more forward
    pass in tokens; within the row limit and the token budget (a row over the budget goes alone).
    Rows of very different lengths then go in separate batches instead of padding the short ones
    to the longest. Exact by dynamic programming over the end of the first batch, from the back;
    ties keep the larger batch first (fewest passes, the biggest one first)."""
    n = len(order)
    cap = max(1, rows) if rows is not None else n if tokens is not None else min(n, _CUT_ROWS)
    best = [0] * (n + 1)  # best[i]: the least cost of order[i:]
    end = [n] * (n + 1)  # where the first batch of order[i:] ends in that plan
    for i in range(n - 1, -1, -1):
        width = max(1, lengths[order[i]])
        best[i] = overhead + width + best[i + 1]
        end[i] = i + 1
        for j in range(i + 2, min(n, i + cap) + 1):
            if tokens is not None and width * (j - i) > tokens:
                break
            cost = overhead + width * (j - i) + best[j]
            if cost <= best[i]:
                best[i], end[i] = cost, j
    batches, i = [], 0
    while i < n:
        batches.append(list(order[i : end[i]]))
        i = end[i]
    return batches


def run_batched(run: Callable[[list[int]], list[R]], lengths: Sequence[int], rows: int | None,
                tokens: int | None = None, sort: bool = True,
                on_batch: Callable[[list[int], list[R]], None] | None = None,
                on_event: EventSink | None = None, should_stop: Callable[[], bool] | None = None,
                overhead: int | None = None) -> list[R]:
    """results[i] = the result for input i, computed by run(batch_of_indexes) batch by batch.

    sort=True: longest first (least padding). sort=False: input order, so on_batch(indexes, results)
    sees the inputs in order, batch after batch (generate writes each batch as it finishes).
    Out-of-memory: the row limit and the token budget are halved and the same rows retried;
    at one row the error is re-raised. Other errors pass through untouched. should_stop() true
    before a batch: base.Cancelled.
    overhead (with sort): batches are cut where padding would cost more than another pass (cut()).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    results: list[R | None] = [None] * len(lengths)
    start = 0
    planned: list[list[int]] = []  # cut()'s batches from `start` on, under the current limits
    while start < len(order):
        if should_stop is not None and should_stop():
            from llmlab.backends.base import Cancelled

            raise Cancelled("stopped: the work is wanted no more")
        if sort and overhead is not None:
            planned = planned or cut(order[start:], lengths, rows, tokens, overhead)
            batch = planned[0]
        else:
            batch = take(order, start, lengths, rows, tokens)
        try:
            out = run(batch)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(batch) <= 1:
                raise
            rows = len(batch) // 2
            tokens = None if tokens is None else max(1, tokens // 2)
            planned = []
            (on_event or _log)(logging.WARNING, f"out of memory at batch size {len(batch)}; retrying with {rows}")
            continue
        for i, result in zip(batch, out):
            results[i] = result
        if on_batch:
            on_batch(batch, out)
        start += len(batch)
        planned = planned[1:]
    return results  # type: ignore[return-value]
