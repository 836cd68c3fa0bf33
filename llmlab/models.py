"""The two primitives every command is built on: `generate` and `loglikelihood` (the LM class).
Model loading lives in llmlab.loading; its public names are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llmlab import console
from llmlab.errors import UsageError
from llmlab.loading import (  # noqa: F401 - re-exported: llmlab.models.load etc. keep working
    ALIASES,
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    ModelRef,
    auto_dtype,
    cache_root,
    cached_models,
    check_cache_writable,
    embedded_gguf,
    gguf_cache_dir,
    load,
    load_tokenizer,
    prepare_gguf,
    resolve_device,
    resolve_dtype,
    resolve_model,
)

# Window sizes above this are tokenizer sentinels ("no limit known"), not real windows.
_ABSURD_WINDOW = 1_000_000
# generate sorts prompts by length within windows of this many batches (results keep input order).
_GEN_WINDOW_BATCHES = 8
# Shared prefixes shorter than this are not worth a KV cache of their own.
_MIN_PREFIX = 8
# T5 uses relative positions, so its config has no window; FLAN-T5 was trained on 512 tokens.
_T5_WINDOW = 512


# ---------------------------------------------------------------- the model boundary


@dataclass
class GenRequest:
    """A prompt to complete. chat: the text already went through the chat template
    (so it carries its own special tokens and none are added)."""

    prompt: str
    chat: bool = False


@dataclass
class GenOutput:
    completions: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    finish_reasons: list[str]  # "stop" (end of text or a stop text) or "length" (max_new_tokens)


@dataclass
class LLRequest:
    """Score `continuation` as what follows `context`. The context is a sequence of text pieces,
    each tokenized on its own and the ids concatenated, so a shared prefix has the same ids in
    every request (and the same ids however the computation is batched or cached)."""

    context: Sequence[str]
    continuation: str
    chat: bool = False


@dataclass
class LLOutput:
    logprob: float  # sum of the continuation tokens' log-probabilities
    tokens: int  # how many tokens the continuation has
    greedy: bool = field(default=False)  # True when every token was the argmax


def context_window(model_config: Any, tokenizer: Any) -> int | None:
    """Tokens the model can attend to: config positions, else the tokenizer's limit, else None."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(model_config, name, None) if model_config is not None else None
        if isinstance(value, int) and 0 < value < _ABSURD_WINDOW:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _ABSURD_WINDOW:
        return limit
    if model_config is not None and getattr(model_config, "model_type", "") in ("t5", "mt5", "umt5"):
        return _T5_WINDOW
    return None


class LM:
    """A loaded model: tokenization helpers plus generate() and loglikelihood()."""

    def __init__(self, name: str, model: Any, tokenizer: Any, device: str):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.window = context_window(model.config, tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def token_ids(self, text: str, chat: bool = False) -> list[int]:
        """Prompt token ids. Chat-templated text has its special tokens already."""
        return self.context_ids([text], chat)

    def _specials(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds before and after a text (BOS; T5's </s>)."""
        if not hasattr(self, "_special_cache"):
            plain = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
            full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
            self._special_cache = (full[:at], full[at + len(plain) :])
        return self._special_cache

    def context_ids(self, pieces: Sequence[str], chat: bool = False) -> list[int]:
        """Token ids of text pieces tokenized one by one, plus the tokenizer's special tokens
        (none for chat-templated text, which carries its own)."""
        ids: list[int] = []
        for piece in pieces:
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        if chat:
            return ids
        before, after = self._specials()
        return before + ids + after

    def continuation_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _ll_ids(self, request: LLRequest) -> tuple[list[int], list[int], list[int]]:
        """(head, tail, continuation) ids: head is the special tokens plus the first context piece
        (the part items share), tail the other pieces; head + tail == context_ids(context)."""
        pieces = list(request.context) or [""]
        head = self.context_ids(pieces[:1], chat=True)
        tail = self.context_ids(pieces[1:], chat=True)
        if not request.chat:
            before, after = self._specials()
            head, tail = before + head, tail + after
        return head, tail, self.continuation_ids(request.continuation)

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True) -> list[LLOutput]:
        """log P(continuation | context) for each request: the sum over the continuation's tokens.

        Decoder-only: requests sharing a first context piece (a few-shot prompt's instruction and
        demonstrations) encode it once and reuse its KV cache (prefix_cache=False turns that off).
        Rows are sorted longest first, batched, and results come back in input order.
        """
        prepared = [self._ll_ids(r) for r in requests]
        for (_, _, cont), request in zip(prepared, requests):
            if not cont:
                raise UsageError(f"cannot score an empty continuation after {request.context[-1][-30:]!r}")
        results: list[LLOutput | None] = [None] * len(requests)
        if self.is_encoder_decoder:
            self._batched(self._score_seq2seq, [(h + t, c) for h, t, c in prepared], list(range(len(prepared))),
                          batch_size, results)
            return results  # type: ignore[return-value]
        plain = list(range(len(prepared)))
        if prefix_cache:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (head, tail, cont) in enumerate(prepared):
                fits = self.window is None or len(head) + len(tail) + len(cont) - 1 <= self.window
                if len(head) >= _MIN_PREFIX and fits:
                    groups.setdefault(tuple(head), []).append(i)
            for head, members in groups.items():
                if len(members) < 2:
                    continue
                cache = self._prefix_cache(list(head[:-1]))
                rows = [([head[-1]] + prepared[i][1], prepared[i][2]) for i in members]
                self._batched(lambda batch: self._score_causal(batch, cache, len(head) - 1), rows, members,
                              batch_size, results)
                cached = set(members)
                plain = [i for i in plain if i not in cached]
        self._batched(self._score_causal, [(prepared[i][0] + prepared[i][1], prepared[i][2]) for i in plain],
                      plain, batch_size, results)
        return results  # type: ignore[return-value]

    def _batched(self, score: Callable[..., list[LLOutput]], rows: list[tuple[list[int], list[int]]],
                 where: list[int], batch_size: int | None, results: list[LLOutput | None]) -> None:
        """Score rows longest first in batches (halving the batch on out-of-memory); put each
        result at results[where[k]]."""
        import torch

        order = sorted(range(len(rows)), key=lambda k: -(len(rows[k][0]) + len(rows[k][1])))
        size = batch_size or self.auto_batch_size()
        start = 0
        while start < len(order):
            batch = order[start : start + size]
            try:
                scored = score([rows[k] for k in batch])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                size = self._halve(len(batch), exc)
                continue
            for k, out in zip(batch, scored):
                results[where[k]] = out
            start += len(batch)

    def _forward_kwargs(self) -> set[str]:
        import inspect

        if not hasattr(self, "_forward_params"):
            self._forward_params = set(inspect.signature(self.model.forward).parameters)
        return self._forward_params

    def _cache_kwarg(self) -> str:
        """transformers 5.x renames forward's `past_key_values` to `cache`; use whichever exists."""
        return "cache" if "cache" in self._forward_kwargs() else "past_key_values"

    def _prefix_cache(self, ids: list[int]) -> Any:
        """The KV cache of a shared prefix, computed once."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if ids:
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                           **{self._cache_kwarg(): cache})
        return cache

    def _score_causal(self, rows: Sequence[tuple[list[int], list[int]]], cache: Any = None,
                      past: int = 0) -> list[LLOutput]:
        """One forward pass over left-padded [context + continuation[:-1]] rows (identical rows run
        once: single-token labels share one row); the last len(continuation) positions of each
        row predict its continuation. With `cache`, rows continue a prefix of `past` tokens."""
        import copy

        import torch

        seqs: dict[tuple[int, ...], int] = {}
        which = []
        for ctx, cont in rows:
            full = ctx + cont
            if cache is None and self.window and len(full) - 1 > self.window:
                full = full[len(full) - 1 - self.window :]  # keep the end: drop the oldest context
            which.append(seqs.setdefault(tuple(full[:-1]), len(seqs)))
        ids, mask = self._pad([list(s) for s in seqs], left=True)
        keep = max(len(cont) for _, cont in rows)
        kwargs: dict[str, Any] = {"input_ids": ids}
        params = self._forward_kwargs()
        if "position_ids" in params:
            kwargs["position_ids"] = past + (mask.cumsum(-1) - 1).clamp(min=0)
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(seqs))
            mask = torch.cat([torch.ones((len(seqs), past), dtype=mask.dtype, device=mask.device), mask], dim=1)
            kwargs.update({self._cache_kwarg(): batch_cache, "use_cache": True})
        kwargs["attention_mask"] = mask
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            logits = self.model(**kwargs).logits[:, -keep:, :]
        return self._gather(logits, which, [cont for _, cont in rows], align_right=True)

    def _score_seq2seq(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[LLOutput]:
        """Encoder reads each distinct context once; the decoder scores every continuation in one pass."""
        import torch

        contexts: dict[tuple[int, ...], int] = {}
        for ctx, _ in rows:
            contexts.setdefault(tuple(ctx), len(contexts))
        enc_ids, enc_mask = self._pad([list(c) for c in contexts], left=False)
        start = self.model.config.decoder_start_token_id
        start = self.tokenizer.pad_token_id if start is None else start
        dec_ids, dec_mask = self._pad([[start] + cont[:-1] for _, cont in rows], left=False)
        which = torch.tensor([contexts[tuple(ctx)] for ctx, _ in rows], device=enc_ids.device)
        with torch.inference_mode():
            encoded = self.model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
            logits = self.model(
                encoder_outputs=(encoded.index_select(0, which),),
                attention_mask=enc_mask.index_select(0, which),
                decoder_input_ids=dec_ids,
                decoder_attention_mask=dec_mask,
            ).logits
        return self._gather(logits, list(range(len(rows))), [cont for _, cont in rows], align_right=False)

    @staticmethod
    def _gather(logits: Any, which: Sequence[int], conts: Sequence[list[int]], align_right: bool) -> list[LLOutput]:
        """Sum the log-probabilities of each continuation from row which[k] of the logits."""
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        width = logprobs.shape[1]
        out = []
        for row, cont in zip(which, conts):
            first = width - len(cont) if align_right else 0
            span = logprobs[row, first : first + len(cont)]
            target = torch.tensor(cont, device=span.device)
            picked = span.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((span.argmax(-1) == target).all())
            out.append(LLOutput(float(picked.sum()), len(cont), greedy))
        return out

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _pad(self, rows: Sequence[list[int]], left: bool):
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(
        self,
        requests: Sequence[GenRequest],
        settings: Any,
        batch_size: int | None = 8,
        on_output: Callable[[int, GenOutput], None] | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> list[GenOutput]:
        """Complete every request, `batch_size` at a time.

        on_output(index, output) is called in input order as results finish (a window of a few
        batches at a time), so callers can write them at once.
        stream(text) receives the completion piece by piece (single request only).
        """
        import torch

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        kwargs = settings.generate_kwargs()
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        outputs: list[GenOutput] = []
        eos = self._eos_ids()
        size = batch_size or self.auto_batch_size()
        # Within a window of a few batches, prompts run longest first so a batch pads little;
        # the window's results are then handed on in input order.
        window = size * _GEN_WINDOW_BATCHES
        for first in range(0, len(requests), window):
            indexes = list(range(first, min(len(requests), first + window)))
            rows = {i: self.token_ids(requests[i].prompt, requests[i].chat) for i in indexes}
            order = sorted(indexes, key=lambda i: -len(rows[i]))
            done: dict[int, GenOutput] = {}
            pos = 0
            while pos < len(order):
                chunk = order[pos : pos + size]
                try:
                    results = self._generate_batch([rows[i] for i in chunk], settings, kwargs, eos,
                                                   stream if len(requests) == 1 else None)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    size = self._halve(len(chunk), exc)
                    continue
                done.update(zip(chunk, results))
                pos += len(chunk)
            for i in indexes:
                outputs.append(done[i])
                if on_output:
                    on_output(i, done[i])
        return outputs

    def _generate_batch(self, rows: list[list[int]], settings: Any, kwargs: dict[str, Any], eos: set[int],
                        stream: Callable[[str], None] | None) -> list[GenOutput]:
        import torch

        ids, mask = self._pad(rows, left=not self.is_encoder_decoder)
        streamer = _Streamer(self.tokenizer, stream, settings.stop) if stream else None
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=self.tokenizer.pad_token_id,
                                      streamer=streamer, **kwargs)
        skip = 1 if self.is_encoder_decoder else ids.shape[1]  # decoder start token / the prompt
        per = settings.num_return_sequences
        results = []
        for i, row in enumerate(rows):
            texts, counts, reasons = [], [], []
            for seq in out[i * per : (i + 1) * per]:
                text, count, reason = self._finish(seq[skip:].tolist(), eos, settings)
                texts.append(text)
                counts.append(count)
                reasons.append(reason)
            results.append(GenOutput(texts, len(row), counts, reasons))
        return results

    def auto_batch_size(self) -> int:
        """--batch-size auto: a generous start (halved on out-of-memory)."""
        return 64 if self.device.startswith("cuda") else 32

    def _halve(self, size: int, exc: BaseException) -> int:
        """After an out-of-memory error: half the batch, or re-raise when already at one."""
        import torch

        out_of_memory = isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) \
            or "out of memory" in str(exc).lower()
        if not out_of_memory or size <= 1:
            raise exc
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        console.warn(f"out of memory at batch size {size}; retrying with {size // 2}")
        return size // 2

    def _finish(self, generated: list[int], eos: set[int], settings: Any) -> tuple[str, int, str]:
        """Cut at end-of-text and at the first stop text; count tokens; say why it ended."""
        reason = "length"
        for n, token in enumerate(generated):
            if token in eos:
                generated, reason = generated[:n], "stop"
                break
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cut = cut_at_stop(text, settings.stop)
        if cut is None:
            return text, len(generated), reason
        # Count only the tokens up to the one that completed the stop text.
        used = next((n for n in range(1, len(generated) + 1)
                     if cut_at_stop(self.tokenizer.decode(generated[:n], skip_special_tokens=True),
                                    settings.stop) is not None), len(generated))
        return cut, used, "stop"


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """The text before the earliest stop text, or None when none occurs."""
    hits = [text.index(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


def _Streamer(tokenizer: Any, emit: Callable[[str], None], stops: Sequence[str]):
    """A transformers TextStreamer that forwards text but holds back what might start a stop text."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.text = ""
            self.sent = 0
            self.stopped = False
            self.hold = max((len(s) for s in stops), default=1) - 1

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return
            self.text += text
            cut = cut_at_stop(self.text, stops)
            if cut is not None:
                self.stopped = True
                end = len(cut)
            elif stream_end:
                end = len(self.text)
            else:
                end = max(self.sent, len(self.text) - self.hold)
            if end > self.sent:
                emit(self.text[self.sent : end])
                self.sent = end

    return Streamer()
