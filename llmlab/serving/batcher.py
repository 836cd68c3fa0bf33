"""One thread owns the model; every request's model calls go through its queue. Calls that arrive
together and can share a forward pass (the same kind, the same settings) are merged into ONE LM
call and their results handed back to each caller, in order. QueuedLM is the LM interface over the
queue, so the library code the commands run (Classifier, session.generate) runs unchanged on it.
A request whose client has gone (CANCEL, set by app.Guard) is dropped from the queue, and the model
call it is in stops (LM.should_stop) once every request merged into that call has gone."""

from __future__ import annotations

import threading
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, Hashable, Sequence, TypeVar, cast

from llmlab.backends.base import LM, Cancelled, GenOutput, GenRequest, LLOutput, LLRequest, PromptScores, Vector

if TYPE_CHECKING:
    import torch

    from llmlab.core.settings import GenerationSettings

_R = TypeVar("_R")  # a request
_O = TypeVar("_O")  # its result

# The request being served in this context: set once its client has disconnected (app.Guard sets it
# up; contextvars follow the request into the thread pool that runs its handler).
CANCEL: ContextVar[threading.Event | None] = ContextVar("llmlab_cancel", default=None)


@dataclass
class _Job(Generic[_R, _O]):
    run: Callable[[list[_R]], list[_O]]  # the LM call, for this job's requests and those merged with it
    requests: list[_R]
    key: Hashable | None  # jobs with equal keys may share one call (the same run); None: runs alone
    done: threading.Event = field(default_factory=threading.Event)
    results: list[_O] | None = None
    error: BaseException | None = None
    cancel: threading.Event | None = field(default_factory=CANCEL.get)

    @property
    def gone(self) -> bool:
        """Its client has disconnected: nobody will read the results."""
        return self.cancel is not None and self.cancel.is_set()


class Batcher:
    """wait_s: how long the first call of a batch waits for company; max_rows: most requests merged."""

    def __init__(self, lm: LM, wait_s: float = 0.005, max_rows: int = 64):
        self.lm, self.wait_s, self.max_rows = lm, wait_s, max_rows
        self._jobs: deque[_Job[object, object]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.calls = 0  # LM calls made (a test reads it to see that requests were merged)
        self.dropped = 0  # queued jobs dropped because their client had gone
        self.stopped = 0  # LM calls stopped part way because every client in them had gone
        self._thread = threading.Thread(target=self._run, name="llmlab-model", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[list[_R]], list[_O]], requests: Sequence[_R],
               key: Hashable | None = None) -> list[_O]:
        """run(requests) on the model thread, merged with other jobs of the same key (whose run is
        the same call: equal keys mean the same kind and settings); blocks until done."""
        job = _Job(run, list(requests), key)
        if job.gone:
            raise Cancelled("the client has disconnected")
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            # The queue holds jobs of every kind: a group only ever merges jobs of one key, whose
            # requests and results are of the types its run() takes and gives.
            self._jobs.append(cast("_Job[object, object]", job))
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.results is not None  # set with done, unless error is
        return job.results

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _drop_gone(self) -> None:
        """(Lock held.) Queued jobs whose client has gone are answered Cancelled, never run."""
        for job in [j for j in self._jobs if j.gone]:
            self._jobs.remove(job)
            job.error = Cancelled("the client has disconnected")
            job.done.set()
            self.dropped += 1

    def _next_group(self) -> list[_Job[object, object]] | None:
        while True:
            with self._cv:
                self._drop_gone()
                while not self._jobs:
                    if self._closed:
                        return None
                    self._cv.wait()
                    self._drop_gone()
                first = self._jobs[0]
            if first.key is not None and self.wait_s:
                time.sleep(self.wait_s)  # let the requests sent together arrive
            with self._cv:
                self._drop_gone()
                if not self._jobs:
                    continue
                first = self._jobs[0]
                group, rows = [self._jobs.popleft()], len(first.requests)
                for job in list(self._jobs):
                    if first.key is not None and job.key == first.key and rows + len(job.requests) <= self.max_rows:
                        self._jobs.remove(job)
                        group.append(job)
                        rows += len(job.requests)
                return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            requests = [r for job in group for r in job.requests]
            self.lm.should_stop = lambda: all(job.gone for job in group)
            try:
                self.calls += 1
                results = group[0].run(requests)
                if all(job.gone for job in group):  # stopped part way: what came back is cut short
                    raise Cancelled("the client has disconnected")
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the group
                self.stopped += isinstance(exc, Cancelled)
                for job in group:
                    job.error = exc
                    job.done.set()
                continue
            finally:
                self.lm.should_stop = None
            start = 0
            for job in group:
                job.results = results[start : start + len(job.requests)]
                start += len(job.requests)
                job.done.set()


class QueuedLM(LM):
    """The served model seen through the batcher: one per request (its on_event is its own)."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher
        inner = batcher.lm
        self.name, self.tokenizer, self.window = inner.name, inner.tokenizer, inner.window
        self.device, self.is_encoder_decoder = inner.device, inner.is_encoder_decoder

    @property
    def num_layers(self) -> int:
        return self._batcher.lm.num_layers

    @property
    def decoder_start_id(self) -> int | None:
        return self._batcher.lm.decoder_start_id

    def eos_ids(self) -> set[int]:
        return self._batcher.lm.eos_ids()

    def token_ids(self, text: str, templated: bool = False) -> list[int]:
        return self._batcher.lm.token_ids(text, templated)

    def continuation_ids(self, text: str) -> list[int]:
        return self._batcher.lm.continuation_ids(text)

    def __getattr__(self, name: str) -> object:  # context_ids, prefix helpers... (never the weights)
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        return getattr(self._batcher.lm, name)

    def next_logits(self, prompt: Sequence[int], context: Sequence[int]) -> torch.Tensor:
        inner = self._batcher.lm
        return self._batcher.submit(lambda _: [inner.next_logits(prompt, context)], [None])[0]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Vector:
        inner = self._batcher.lm
        return self._batcher.submit(lambda _: [inner.embed(texts, batch_size)], [None])[0]

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        layers = tuple(hidden_layers) if hidden_layers else None
        inner = self._batcher.lm
        return self._batcher.submit(lambda rows: inner.loglikelihood(rows, batch_size=batch_size,
                                                                     prefix_cache=prefix_cache, hidden_layers=layers),
                                    requests, ("ll", batch_size, prefix_cache, layers))

    def prompt_logprobs(self, prompts: Sequence[list[int]], top: int = 1,
                        batch_size: int | None = 16) -> list[PromptScores]:
        inner = self._batcher.lm
        return self._batcher.submit(lambda rows: inner.prompt_logprobs(rows, top=top, batch_size=batch_size),
                                    prompts, ("pl", top, batch_size))

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        # A streamed request runs alone (the backend streams only single prompts); others merge when
        # everything that shapes the output matches.
        key = None if stream else ("gen", repr(settings), batch_size, engine)
        inner = self._batcher.lm
        outputs = self._batcher.submit(lambda rows: inner.generate(rows, settings, batch_size=batch_size, stream=stream,
                                                                   engine=engine), requests, key)
        for i, output in enumerate(outputs):
            if on_output:
                on_output(i, output)
        return outputs
