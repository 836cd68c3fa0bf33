"""Stop texts for transformers' generate(), with any tokenizer: a stopping criterion that decodes
each row's new tokens and looks for the stop texts in the text (transformers' own `stop_strings`
needs every stop text to be reachable through its token table and refuses e.g. "\\n" for T5),
and a streamer that never sends text past a stop text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, StoppingCriteriaList, TextStreamer

    from llmlab.backends.base import Tokenizer

from llmlab.backends.base import HoldBack


def reachable(tokenizer: Tokenizer, stop: str) -> bool:
    """Whether decoded text can ever contain `stop`: its own tokenization must decode back to a
    text holding it. T5 normalises "\\n" to a space, so "\\n\\n" comes back as "" and can't occur."""
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
    return stop in tokenizer.decode(ids, skip_special_tokens=True)


def criteria(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int) -> StoppingCriteriaList:
    """A StoppingCriteriaList that ends each row on its own once its decoded new tokens
    (input_ids[:, start:]) contain a stop text. Rows that stopped stay stopped; transformers pads
    them while the other rows go on, so each row's text equals what it would be alone."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopTexts(StoppingCriteria):
        def __init__(self) -> None:
            self.done: list[bool] = []  # per row of input_ids: a stop text has appeared

        def __call__(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None,
                     **kwargs: object) -> torch.BoolTensor:
            if not self.done:
                self.done = [False] * input_ids.shape[0]
            live = [r for r, stopped in enumerate(self.done) if not stopped]
            # One device->host copy per step for the rows still running, then one decode call.
            texts = tokenizer.batch_decode(input_ids[live, start:].tolist(), skip_special_tokens=True)
            for r, text in zip(live, texts):
                self.done[r] = any(s in text for s in stops)
            done = torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
            return cast("torch.BoolTensor", done)  # transformers annotates the legacy class; a bool tensor is it

    return StoppingCriteriaList([StopTexts()])


def with_stop(criteria: StoppingCriteriaList | None, should_stop: Callable[[], bool] | None) -> StoppingCriteriaList:
    """criteria (or none) plus, with should_stop (LM.should_stop), one that ends every row between decode
    steps once should_stop() says nobody wants them any more."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if should_stop is None:
        return criteria if criteria is not None else StoppingCriteriaList()
    wanted_no_more = should_stop

    class Wanted(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None,
                     **kwargs: object) -> torch.BoolTensor:
            full = torch.full((input_ids.shape[0],), bool(wanted_no_more()), dtype=torch.bool, device=input_ids.device)
            return cast("torch.BoolTensor", full)

    return StoppingCriteriaList([*(criteria or []), Wanted()])


def streamer(tokenizer: PreTrainedTokenizerBase, emit: Callable[[str], None], stops: Sequence[str]) -> TextStreamer:
    """A transformers TextStreamer that forwards text through HoldBack (see there)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.hold = HoldBack(stops)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out = self.hold.feed(text, end=stream_end)
            if out:
                emit(out)

    return Streamer()
