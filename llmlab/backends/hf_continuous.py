"""Continuous batching for `generate`: transformers' own `model.generate_batch` (paged attention;
requests join and leave the running batch token by token, nothing is padded). One of two engines
behind HFLM.generate, chosen by --gen-engine:

- padded: `model.generate` on left-padded batches of consecutive inputs (backends/hf.py).
- continuous: `model.generate_batch` on the same batches; greedy decoding only (transformers drops
  the logits processors it does not support, and llmlab never drops a setting silently).
- auto: continuous where it was measured faster and the settings allow it, else padded.

Outputs are the same under greedy decoding: each row is decoded on its own in both engines, and
both end a row at end-of-text; stop texts are cut here after the fact (generate_batch takes no
stopping criteria), so a row that hits one keeps generating to its token limit and is then cut at
the same place the padded engine cuts it. Batches keep the write rule: each call handles one batch
of consecutive inputs, handed on in input order. Like the padded engine, a batch nobody wants any more
(LM.should_stop: llmlab serve's clients have gone) stops part way, between decode steps.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from math import ceil
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from llmlab.backends.base import Cancelled, GenOutput
from llmlab.core.errors import ModelError, UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.requests import GenerationOutput

    from llmlab.backends.hf_score import Scorer
    from llmlab.core.settings import GenerationSettings

    from typing import Protocol

    class Generator(Scorer, Protocol):
        """What continuous batching needs of an HFLM (hf.py imports this module, so it cannot name HFLM)."""

        @property
        def is_encoder_decoder(self) -> bool: ...
        @property
        def should_stop(self) -> Callable[[], bool] | None: ...

        def _finish(self, generated: list[int], eos: set[int], stops: Sequence[str]) -> tuple[str, int, str]: ...

ENGINES = ("auto", "padded", "continuous")

# What --gen-engine auto runs per device kind when the settings allow continuous batching: the
# faster engine in bench/bench.py's engine case (same prompts, same process, tokens/s).
# cpu: measured on this project's 2-core CPU: continuous 9.3 vs padded 4.8 tokens/s (1.9x), smollm2,
# 16 DialogSum prompts x 50 new tokens, batches of 16, identical completions (README, Performance).
# cuda: NOT measured yet (no GPU in this project's sessions so far); padded until
# bench/gpu_check.sh has measured both engines on a GPU. mps: not measured either.
AUTO = {"cpu": "continuous", "cuda": "padded", "mps": "padded"}
# ... but only for calls with at least this many new tokens in all (requests x max_new_tokens):
# generate_batch has a fixed cost per batch, and 4 prompts x 4 tokens ran at 0.7x the padded
# engine on that CPU. The threshold lies between the two measured sizes (16 and 800).
AUTO_MIN_NEW_TOKENS = 256

# Tokens per KV-cache page (generate_batch's page_size, >= 4): smaller pages waste less of a
# request's last page, larger ones mean fewer block-table entries.
_PAGE = 64
# Seconds between looks at LM.should_stop while generate_batch's manager decodes.
_POLL_S = 0.05
# On a CPU, tokens one forward step may hold (prefill is split into steps of at most this many):
# the step's attention mask grows with its square.
_CPU_STEP_TOKENS = 2048


def unsupported(settings: GenerationSettings) -> str | None:
    """What in these settings continuous batching cannot do (None: it can do them all). Torch-free,
    so the CLI refuses before any model time."""
    if settings.do_sample:
        return "sampling (--sample, --temperature, --top-k, --top-p)"
    if settings.num_beams > 1:
        return "beam search (--num-beams)"
    if settings.num_return_sequences > 1:
        return "several completions per prompt (--num-return-sequences)"
    if settings.repetition_penalty != 1.0:
        return "--repetition-penalty"
    if getattr(settings, "logprobs", False):
        return "per-token log-probabilities (--logprobs, --top-logprobs)"
    return None


def check(engine: str, settings: GenerationSettings, backend: str = "hf") -> None:
    """Refuse --gen-engine continuous with settings it cannot honour (one line, before loading)."""
    if engine not in ENGINES:
        raise UsageError(f"invalid --gen-engine '{engine}': choose {', '.join(ENGINES)}")
    if engine != "continuous":
        return
    if backend != "hf":
        raise UsageError(f"--gen-engine continuous is for --backend hf; --backend {backend} batches on its own")
    why = unsupported(settings)
    if why:
        raise UsageError(f"--gen-engine continuous decodes greedily and cannot do {why}; "
                         "use --gen-engine padded (or auto)")


def choose(lm: Generator, settings: GenerationSettings, requests: int = 2, engine: str = "auto") -> str:
    """'padded' or 'continuous' for this model, these settings and this many requests (engine:
    the user's --gen-engine). auto keeps one request on the padded engine: there is nothing to batch, the
    padded engine streams it, and a generate_batch call has a fixed cost (about 2 s on the 2-core
    CPU, mostly the two full garbage collections its manager runs when it stops)."""
    check(engine, settings)
    if engine == "padded":
        return "padded"
    if lm.is_encoder_decoder or not hasattr(lm.model, "generate_batch"):
        if engine == "continuous":
            why = "an encoder-decoder model" if lm.is_encoder_decoder else "this transformers version"
            raise UsageError(f"--gen-engine continuous does not run {why} (transformers' generate_batch "
                             "is for decoder-only models); use --gen-engine padded (or auto)")
        return "padded"
    if engine == "continuous":
        return "continuous"
    if requests < 2 or requests * settings.max_new_tokens < AUTO_MIN_NEW_TOKENS:
        return "padded"
    if unsupported(settings) is not None or getattr(lm.model, "hf_device_map", None):
        return "padded"  # (a model spread by --device-map: not measured with generate_batch)
    return AUTO.get(lm.device.split(":")[0], "padded")


def batch_config(rows: Sequence[Sequence[int]], new_tokens: int, device: str) -> ContinuousBatchingConfig:
    """A cache that holds every row of the batch at once (so none is evicted), and no more: left to
    itself generate_batch takes 90% of the free memory, which on a CPU is the machine's RAM."""
    from transformers.generation import configuration_utils as cu

    pages = sum(ceil((len(r) + new_tokens) / _PAGE) for r in rows) + 1
    step = None if device.startswith("cuda") else min(_CPU_STEP_TOKENS, sum(len(r) for r in rows) + len(rows))
    return cu.ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=step, page_size=_PAGE)


@contextmanager
def signals_after_the_call() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while generate_batch runs, and deliver them when it returns.

    Its manager runs full garbage collections when it stops; an exception that a signal handler
    raises (KeyboardInterrupt, llmlab's SIGTERM exit) while a finalizer runs is printed and dropped
    by Python, and the run went on to the end (seen with SIGTERM). Held, the signal stops the run
    right after this batch: a stop waits for the batch in progress, and loses at most that batch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])  # now through the handler it had (ignored stays ignored)


def generate_rows(lm: Generator, rows: list[list[int]], settings: GenerationSettings, stops: list[str], eos: set[int],
                  stream: Callable[[str], None] | None) -> list[GenOutput]:
    """One batch through generate_batch; the same GenOutput as HFLM._generate_batch, row by row.
    Stop texts are cut after the fact from settings.stop, as the padded engine's _finish does
    (`stops`, the reachable ones it gives its stopping criterion, has no use here). A failed row raises (an out-of-memory one as torch.OutOfMemoryError, so the batch is halved)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False,
                              eos_token_id=sorted(eos) or None, pad_token_id=lm.tokenizer.pad_token_id)
    with signals_after_the_call():
        results = _run_batch(lm, [list(r) for r in rows], config, settings.max_new_tokens)
    failed = [r.error for r in results if r.error is not None]
    if failed or len(results) != len(rows):
        why = failed[0] if failed else f"{len(rows) - len(results)} of {len(rows)} rows returned nothing"
        if "out of memory" in str(why).lower():
            raise torch.OutOfMemoryError(str(why))
        raise ModelError(f"continuous batching failed: {why}; try --gen-engine padded")
    outputs = []
    for row, result in zip(rows, results):
        text, used, reason = lm._finish(list(result.generated_tokens), eos, settings.stop)
        outputs.append(GenOutput([text], len(row), [used], [reason]))
    if stream is not None:  # nothing arrives token by token here: the whole completion is one piece
        stream(outputs[0].completions[0])
    return outputs


def _run_batch(lm: Generator, rows: list[list[int]], config: GenerationConfig, new_tokens: int) -> list[GenerationOutput]:
    """model.generate_batch's loop (its manager, its workload hints), which also asks lm.should_stop
    while the manager decodes: once nobody wants the rows any more they are cancelled (the manager
    drops them after its current decode step, then stops) and base.Cancelled is raised. The results in input order; failed rows are missing."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(max_prompt_length=max(len(r) for r in rows), max_generated_length=new_tokens,
                          num_requests=len(rows))
    done: dict[str, GenerationOutput] = {}
    with lm.model.continuous_batching_context_manager(
            generation_config=config, continuous_batching_config=batch_config(rows, new_tokens, lm.device), block=True,
            timeout=5, workload_hints=hints) as manager:
        ids = manager.add_requests(inputs=rows, max_new_tokens=new_tokens)
        while len(done) < len(ids):
            if lm.should_stop is not None and lm.should_stop():
                for request in ids:  # the manager stops once nothing is left to finish (it flushes before stopping)
                    if request not in done:
                        manager.cancel_request(request)
                raise Cancelled("stopped: the work is wanted no more")
            result = manager.get_result(timeout=_POLL_S)
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                break  # the manager's thread ended: the rows it did not finish are missing
    return [done[i] for i in ids if i in done]
