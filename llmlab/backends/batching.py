"""One batching path for scoring and generation, modelled on lm-evaluation-harness's `Collator`:
order the inputs (longest first, so the first batch is the largest and an out-of-memory error
shows at once), cut the order into batches by a row count and/or a token budget, run each batch,
put every result back at its input's position. On out-of-memory the batch is halved and retried.
No torch here: out-of-memory is recognised by the exception's type name and message."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

R = TypeVar("R")
EventSink = Callable[[int, str], None]


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


def run_batched(run: Callable[[list[int]], list[R]], lengths: Sequence[int], rows: int | None,
                tokens: int | None = None, sort: bool = True,
                on_batch: Callable[[list[int], list[R]], None] | None = None,
                on_event: EventSink | None = None, should_stop: Callable[[], bool] | None = None) -> list[R]:
    """results[i] = the result for input i, computed by run(batch_of_indexes) batch by batch.

    sort=True: longest first (least padding). sort=False: input order, so on_batch(indexes, results)
    sees the inputs in order, batch after batch (generate writes each batch as it finishes).
    Out-of-memory: the row limit and the token budget are halved and the same rows retried;
    at one row the error is re-raised. Other errors pass through untouched. should_stop() true
    before a batch: base.Cancelled.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    results: list[R | None] = [None] * len(lengths)
    start = 0
    while start < len(order):
        if should_stop is not None and should_stop():
            from llmlab.backends.base import Cancelled

            raise Cancelled("stopped: the work is wanted no more")
        batch = take(order, start, lengths, rows, tokens)
        try:
            out = run(batch)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(batch) <= 1:
                raise
            rows = len(batch) // 2
            tokens = None if tokens is None else max(1, tokens // 2)
            (on_event or _log)(logging.WARNING, f"out of memory at batch size {len(batch)}; retrying with {rows}")
            continue
        for i, result in zip(batch, out):
            results[i] = result
        if on_batch:
            on_batch(batch, out)
        start += len(batch)
    return results  # type: ignore[return-value]
