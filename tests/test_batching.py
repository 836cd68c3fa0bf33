"""Properties of the pure parts of the model boundary: the batching utility, stop-text cutting and
the streaming hold-back. No torch: these run in milliseconds."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.backends.base import HoldBack, cut_at_stop
from llmlab.backends.batching import cut, is_out_of_memory, run_batched, take

lengths_st = st.lists(st.integers(min_value=1, max_value=50), max_size=40)
limits_st = st.one_of(st.none(), st.integers(min_value=1, max_value=9))
budget_st = st.one_of(st.none(), st.integers(min_value=1, max_value=200))


class FakeOOM(RuntimeError):
    pass


FakeOOM.__name__ = "OutOfMemoryError"  # recognised by type name, as torch.OutOfMemoryError is


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, rows=limits_st, tokens=budget_st, sort=st.booleans())
def test_every_item_once_results_in_input_order(lengths, rows, tokens, sort):
    seen = []

    def run(batch):
        seen.append(list(batch))
        return [f"result {i}" for i in batch]

    results = run_batched(run, lengths, rows, tokens, sort=sort)
    assert results == [f"result {i}" for i in range(len(lengths))]
    assert sorted(i for b in seen for i in b) == list(range(len(lengths)))
    for batch in seen:
        assert rows is None or len(batch) <= rows
        assert tokens is None or len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= tokens
    flat = [i for b in seen for i in b]
    if sort:
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    else:
        assert flat == list(range(len(lengths)))  # input order, batch after batch


def cost(batches, lengths, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


def cheapest(order, lengths, rows, tokens, overhead):
    """Every way of cutting order into consecutive batches within the limits: the least cost."""
    if not order:
        return 0
    options = []
    for j in range(1, len(order) + 1):
        width = lengths[order[0]]
        if j > 1 and ((rows is not None and j > rows) or (tokens is not None and width * j > tokens)):
            break
        options.append(overhead + width * j + cheapest(order[j:], lengths, rows, tokens, overhead))
    return min(options)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=50), max_size=9), rows=limits_st, tokens=budget_st,
       overhead=st.integers(min_value=0, max_value=60))
def test_cut_is_the_cheapest_split_within_the_limits(lengths, rows, tokens, overhead):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = cut(order, lengths, rows, tokens, overhead)
    assert [i for b in batches for i in b] == order  # consecutive, each row once, longest first
    for b in batches:
        assert rows is None or len(b) <= rows
        assert tokens is None or len(b) == 1 or len(b) * lengths[b[0]] <= tokens
    assert cost(batches, lengths, overhead) == cheapest(order, lengths, rows, tokens, overhead)
    greedy, start = [], 0
    while start < len(order):
        greedy.append(take(order, start, lengths, rows, tokens))
        start += len(greedy[-1])
    assert cost(batches, lengths, overhead) <= cost(greedy, lengths, overhead)


@pytest.mark.parametrize("lengths, overhead, expected", [
    ([60, 58, 20, 19, 18], 24, [[0, 1], [2, 3, 4]]),  # 3 short rows padded to 58 cost more than a pass
    ([60, 58, 20, 19, 18], 1000, [[0, 1, 2, 3, 4]]),  # a pass dearer than all the padding: one batch
    ([5, 5, 5, 5], 24, [[0, 1, 2], [3]]),  # rows=3: the larger batch first
])
def test_cut_splits_where_padding_costs_more_than_a_pass(lengths, overhead, expected):
    assert cut(range(len(lengths)), lengths, 3 if lengths == [5, 5, 5, 5] else None, None, overhead) == expected


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, rows=limits_st, tokens=budget_st)
def test_run_batched_with_overhead_runs_cuts_batches(lengths, rows, tokens):
    seen = []

    def run(batch):
        seen.append(list(batch))
        return [f"result {i}" for i in batch]

    assert run_batched(run, lengths, rows, tokens, overhead=10) == [f"result {i}" for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert seen == cut(order, lengths, rows, tokens, 10)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
       fits=st.integers(min_value=1, max_value=8), rows=st.integers(min_value=1, max_value=16))
def test_out_of_memory_halves_until_it_fits(lengths, fits, rows):
    sizes, events, order = [], [], []

    def run(batch):
        sizes.append(len(batch))
        if len(batch) > fits:
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        order.extend(batch)
        return [-i for i in batch]

    results = run_batched(run, lengths, rows, sort=False, on_event=lambda level, msg: events.append((level, msg)))
    assert results == [-i for i in range(len(lengths))] and order == list(range(len(lengths)))
    assert all(level == logging.WARNING and msg.startswith("out of memory at batch size") for level, msg in events)
    assert len(events) == sum(1 for s in sizes if s > fits)
    assert max(s for s in sizes if s <= fits) <= fits


def test_out_of_memory_halves_the_row_limit():
    sizes = []

    def run(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise FakeOOM("out of memory")
        return batch

    assert run_batched(run, [5] * 7, rows=8, on_event=lambda *a: None) == list(range(7))
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # 7 rows fail, 3 fail, then one at a time
    sizes.clear()
    run_batched(run, [5] * 7, rows=None, tokens=40, on_event=lambda *a: None)
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # 40 tokens hold 8 rows of 5: the same path
    sizes.clear()
    assert run_batched(run, [5] * 7, rows=8, on_event=lambda *a: None, overhead=0) == list(range(7))
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # cut() plans again under the halved limit


def test_out_of_memory_at_one_row_and_other_errors_propagate():
    def always_oom(batch):
        raise FakeOOM("out of memory")

    with pytest.raises(FakeOOM):
        run_batched(always_oom, [3, 2], rows=4, on_event=lambda *a: None)

    def broken(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(broken, [3, 2], rows=4)


@pytest.mark.parametrize("exc, oom", [
    (FakeOOM("x"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes"), True),
    (RuntimeError("CUDA out of memory."), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_what_counts_as_out_of_memory(exc, oom):
    assert is_out_of_memory(exc) is oom


# ---------------------------------------------------------------- stop texts

text_st = st.text(alphabet="ab\n .", max_size=30)
stops_st = st.lists(st.text(alphabet="ab\n .", min_size=1, max_size=4), max_size=3)


@given(text=text_st, stops=stops_st)
def test_cut_at_stop_is_the_text_before_the_earliest_stop(text, stops):
    cut = cut_at_stop(text, stops)
    if cut is None:
        assert not any(s in text for s in stops)
        return
    assert text.startswith(cut)
    assert any(text[len(cut):].startswith(s) for s in stops)  # a stop text starts right there
    assert all(text.find(s) == -1 or text.find(s) >= len(cut) for s in stops)


@settings(max_examples=300)
@given(pieces=st.lists(st.text(alphabet="ab\n .", max_size=5), max_size=12), stops=stops_st)
def test_streamed_text_is_the_final_text_and_never_passes_a_stop(pieces, stops):
    hold = HoldBack(stops)
    sent, received = "", ""
    for piece in pieces:
        sent += hold.feed(piece)
        received += piece
        assert cut_at_stop(sent, stops) is None  # nothing at or past a stop text ever goes out
        assert received.startswith(sent)
        if cut_at_stop(received, stops) is not None:
            break  # generation stops at the first stop text
    sent += hold.feed("", end=True)
    final = cut_at_stop(received, stops)
    assert sent == (received if final is None else final)
