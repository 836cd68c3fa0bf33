"""The Hugging Face transformers backend: HFLM runs any causal or seq2seq model that
transformers loads. The only module (with hf_score, prefix_cache, stopping) that runs torch."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Sequence

from llmlab.backends import prefix_cache
from llmlab.backends import hf_continuous, hf_score, stopping
from llmlab.backends.base import (LM, EventSink, GenOutput, GenRequest, LLOutput, LLRequest, PromptScores, TokenLogprob,
                                  Vector, as_tokenizer, cut_at_stop, log_event)
from llmlab.backends.batching import PASS_TOKENS, run_batched
from llmlab.core.errors import ContextOverflowError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase
    from llmlab.backends.hfutil import Model
    from transformers.cache_utils import DynamicCache

    from transformers import StoppingCriteriaList, TextStreamer

    from llmlab.backends.prefix_cache import Group
    from llmlab.core.settings import GenerateKwargs, GenerationSettings

    class _Generate(GenerateKwargs, total=False):
        """generate()'s arguments: the settings' own, plus the stop texts and a streamer."""

        stopping_criteria: StoppingCriteriaList
        streamer: TextStreamer

# Window sizes above this are tokenizer sentinels ("no limit known"), not real windows.
_ABSURD_WINDOW = 1_000_000
# T5 uses relative positions, so its config has no window; FLAN-T5 was trained on 512 tokens.
_T5_WINDOW = 512
# --batch-size auto: rows per batch at most, and padded tokens per batch on a CPU.
_AUTO_ROWS = {"cpu": 32, "cuda": 512}
_CPU_TOKEN_BUDGET = 16384
# On a GPU, the share of free memory a batch may use (the rest: fragmentation, the allocator).
_GPU_MEMORY_SHARE = 0.5
# Prefix KV caches kept between loglikelihood calls (classify calls it once per chunk of items, with
# the same demonstrations; an ensemble cycles through one prefix per draw).
_PREFIX_MEMO = 4


def context_window(model_config: object, tokenizer: object) -> int | None:
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


class HFLM(LM):
    """A loaded transformers model and its tokenizer on one device."""

    # Rows continuing a cached prefix attend to ONE copy of it (shared_prefix) where the model's
    # family supports that; False: every batch repeats the prefix's KV cache per row (prefix_cache.extend).
    share_prefix = True
    reuse_prompts = True  # a one-prompt generate reuses a remembered prompt's start (prefix_cache.for_generation)

    def __init__(self, name: str, model: Model, tokenizer: PreTrainedTokenizerBase, device: str,
                 on_event: EventSink | None = None):
        self.name = name
        self.model = model
        self.hf_tokenizer = tokenizer  # the transformers object, for what only transformers takes (batches, streamers)
        self.tokenizer = as_tokenizer(tokenizer)
        self.device = device
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.window = context_window(model.config, tokenizer)
        self.on_event = on_event or log_event
        self._noted: set[str] = set()  # stop texts already reported as unreachable
        self._prefixes: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()  # see cached_prefix

    # -- tokenization: one natural tokenization of each text

    def encode(self, texts: Sequence[str], templated: Sequence[bool]) -> list[list[int]]:
        """Token ids of each whole text, in one tokenizer call per kind (templated text carries
        its own special tokens; other text gets the tokenizer's, e.g. BOS, T5's </s>)."""
        out: list[list[int]] = [[] for _ in texts]
        for flag in (False, True):
            where = [i for i, t in enumerate(templated) if bool(t) == flag]
            if where:
                ids = self.hf_tokenizer([texts[i] for i in where], add_special_tokens=not flag)["input_ids"]
                for i, row in zip(where, ids):
                    out[i] = list(row)
        return out

    def context_ids(self, pieces: Sequence[str], templated: bool = False) -> list[int]:
        """The natural tokenization of the pieces joined (the text the model sees)."""
        return self.token_ids("".join(pieces), templated)

    def encode_pairs(self, requests: Sequence[LLRequest]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) per request, split as lm-evaluation-harness does: the
        context's trailing whitespace moves onto the continuation; decoder-only models tokenize
        context + continuation as a whole and the continuation is what follows the context's own
        tokens; encoder-decoder models tokenize the continuation alone (it goes to the decoder)."""
        contexts, conts = [], []
        for r in requests:
            n = len(r.context) - len(r.context.rstrip())
            contexts.append(r.context[: len(r.context) - n])
            conts.append(r.context[len(r.context) - n :] + r.continuation)
        flags = [r.templated for r in requests]
        todo = [i for i, r in enumerate(requests) if r.context_ids is None or contexts[i] != r.context]
        ctx_ids = [list(r.context_ids or []) for r in requests]
        for i, ids in zip(todo, self.encode([contexts[i] for i in todo], [flags[i] for i in todo])):
            ctx_ids[i] = ids
        if self.is_encoder_decoder:
            return list(zip(ctx_ids, self.encode(conts, [True] * len(conts))))
        wholes = self.encode([c + k for c, k in zip(contexts, conts)], flags)
        return [(ctx, whole[len(ctx) :]) for ctx, whole in zip(ctx_ids, wholes)]

    # -- scoring

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        """log P(continuation | context) for each request: the sum over the continuation's tokens.

        Decoder-only: requests sharing a prefix (a few-shot prompt's instruction and
        demonstrations) run its tokens once and reuse their KV cache, where exact (see
        llmlab.backends.prefix_cache; prefix_cache=False turns it off). Rows are sorted longest first,
        batched, and results come back in input order. hidden_layers: each output also carries
        those layers' states at the last context token (LLOutput.hidden; the forward pass then
        keeps every layer's states for the batch, so memory grows with depth).
        """
        rows = self.encode_pairs(requests)
        self._check_rows(requests, rows)
        results: list[LLOutput | None] = [None] * len(requests)
        sizes, cut = self._sizes(batch_size), PASS_TOKENS["cpu" if self.device == "cpu" else "gpu"]  # see batching.cut
        if self.is_encoder_decoder:
            return run_batched(lambda b: hf_score.seq2seq(self, [rows[i] for i in b], hidden_layers),
                               [len(c) + len(k) for c, k in rows], *sizes, on_event=self.on_event,
                               should_stop=self.should_stop, overhead=cut)
        plain = set(range(len(rows)))
        for group in self._groups(requests, rows) if prefix_cache else []:
            cache = self.cached_prefix(group.prefix_ids)
            past = len(group.prefix_ids)
            tails = [(rows[i][0][past:], rows[i][1]) for i in group.members]
            scored = run_batched(lambda b: hf_score.causal(self, [tails[k] for k in b], cache, past, hidden_layers),
                                 [len(c) + len(k) for c, k in tails], *sizes, on_event=self.on_event,
                                 should_stop=self.should_stop, overhead=cut)
            for i, out in zip(group.members, scored):
                results[i] = out
            plain -= set(group.members)
        rest = sorted(plain)
        scored = run_batched(lambda b: hf_score.causal(self, [rows[rest[k]] for k in b], layers=hidden_layers),
                             [len(rows[i][0]) + len(rows[i][1]) for i in rest], *sizes, on_event=self.on_event,
                             should_stop=self.should_stop, overhead=cut)
        for i, out in zip(rest, scored):
            results[i] = out
        return results  # type: ignore[return-value]

    def prompt_logprobs(self, prompts: Sequence[list[int]], top: int = 1,
                        batch_size: int | None = 16) -> list[PromptScores]:
        if self.is_encoder_decoder:
            raise UsageError(f"{self.name} is an encoder-decoder model: it does not predict its prompt's tokens")
        rows = [list(p) for p in prompts]
        if any(not r for r in rows):
            raise UsageError("cannot score an empty prompt")
        # Every position's whole float32 distribution is kept: a small token budget bounds that memory.
        return run_batched(lambda b: hf_score.prompt_tokens(self, [rows[i] for i in b], max(1, top)),
                           [len(r) for r in rows], self._sizes(batch_size)[0], 1024, on_event=self.on_event,
                           should_stop=self.should_stop)

    def _groups(self, requests: Sequence[LLRequest], rows: list[tuple[list[int], list[int]]]) -> list[Group]:
        """Prefix-cache groups: each distinct (prefix, templated) is tokenized once."""
        keys = {(r.prefix, r.templated) for r in requests if r.prefix}
        keys_list = sorted(keys)
        ids = dict(zip(keys_list, self.encode([k[0] for k in keys_list], [k[1] for k in keys_list])))
        prefixes = [((r.prefix, r.templated), ids[(r.prefix, r.templated)]) if r.prefix else None for r in requests]
        return prefix_cache.plan(prefixes, rows)

    def cached_prefix(self, ids: list[int]) -> DynamicCache:
        """The KV cache of a prefix, computed once for the last _PREFIX_MEMO prefixes used (nothing
        writes to it: batches attend to it or copy it). Code that changes the weights calls
        forget_prefixes() (backends/trainable.py does)."""
        key = tuple(ids)
        if key not in self._prefixes:
            self._prefixes[key] = self.prefix_kv(ids)
            while len(self._prefixes) > _PREFIX_MEMO:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        return self._prefixes[key]

    def forget_prefixes(self) -> None:
        self._prefixes.clear()

    def prefix_kv(self, ids: list[int]) -> DynamicCache:
        """The KV cache of a shared prefix, computed once (a seam tests can watch)."""
        return prefix_cache.compute(self.model, ids, self.device, self.cache_kwarg(), self.forward_params())

    def _check_rows(self, requests: Sequence[LLRequest], rows: list[tuple[list[int], list[int]]]) -> None:
        """Every continuation has tokens and every row fits the window (the prompt builder fits
        prompts to it; nothing is cut silently here)."""
        for (ctx, cont), request in zip(rows, requests):
            if not cont:
                raise UsageError(f"cannot score an empty continuation after {request.context[-30:]!r}")
            length = len(ctx) if self.is_encoder_decoder else len(ctx) + len(cont) - 1
            if self.window is not None and length > self.window:
                raise ContextOverflowError(
                    f"a prompt and its label need {length} tokens, over the model's {self.window}-token "
                    "window; use fewer --shots or --overflow drop-shots|truncate")

    def forward_params(self) -> set[str]:
        import inspect

        if not hasattr(self, "_forward_params"):
            self._forward_params = set(inspect.signature(self.model.forward).parameters)
        return self._forward_params

    def cache_kwarg(self) -> str:
        """transformers 5.x renames forward's `past_key_values` to `cache`; use whichever exists."""
        return "cache" if "cache" in self.forward_params() else "past_key_values"

    # -- batch sizes

    def _sizes(self, batch_size: int | None) -> tuple[int, int | None]:
        """(rows per batch, padded tokens per batch or None): a given --batch-size is a row count;
        auto is a row cap plus a token budget."""
        if batch_size:
            return batch_size, None
        return self.auto_batch_size(), self.token_budget()

    def auto_batch_size(self) -> int:
        return _AUTO_ROWS["cuda" if self.device.startswith("cuda") else "cpu"]

    def token_budget(self) -> int:
        """Padded tokens one batch may hold: fixed on a CPU; on a GPU what half the free memory
        holds at the model's activation + KV cost per token (halved again on out-of-memory)."""
        if not self.device.startswith("cuda"):
            return _CPU_TOKEN_BUDGET
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        return max(512, int(free * _GPU_MEMORY_SHARE / self._bytes_per_token()))

    def _bytes_per_token(self) -> int:
        """Rough memory one token of a batch costs: the KV cache of every layer plus one layer's
        activations (inference frees each layer's as it goes)."""
        c = self.model.config
        hidden = getattr(c, "hidden_size", 0) or getattr(c, "d_model", 1024)  # 0 = absent (falsy as None; keeps it int)
        layers = getattr(c, "num_hidden_layers", 0) or getattr(c, "num_layers", 24)
        heads = getattr(c, "num_attention_heads", 0) or getattr(c, "num_heads", 16)
        kv_heads = getattr(c, "num_key_value_heads", 0) or heads
        inner = getattr(c, "intermediate_size", 0) or getattr(c, "d_ff", 0) or 4 * hidden
        size = self.model.dtype.itemsize
        return size * (2 * layers * hidden * kv_heads // heads + 8 * hidden + 2 * inner)

    # -- generation

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        """Complete every request, in batches of consecutive inputs.

        Write rule: on_output(index, output) is called, in input order, for every input of a batch
        as soon as that batch is done; batches run in input order, so when on_output(i) is called
        every input before i has been handed on too, and an interrupted run loses at most the batch
        in progress. stream(text) receives the completion piece by piece (single request only).
        """
        import torch

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        prompts = self.encode([r.prompt for r in requests], [r.templated for r in requests])
        self._check_prompts(prompts, settings.max_new_tokens)
        stops = [s for s in settings.stop if self._reachable(s)]
        per_prompt = max(settings.num_return_sequences, settings.num_beams)
        lengths = [(len(p) + settings.max_new_tokens) * per_prompt for p in prompts]
        eos = self.eos_ids()
        padded = hf_continuous.choose(self, settings, len(requests), engine) == "padded"
        batch_engine = self._generate_batch if padded else lambda *args: hf_continuous.generate_rows(self, *args)

        def run(batch: list[int]) -> list[GenOutput]:
            return batch_engine([prompts[i] for i in batch], settings, stops, eos,
                                stream if len(requests) == 1 else None)

        def hand_on(batch: list[int], outputs: list[GenOutput]) -> None:
            for i, output in zip(batch, outputs):
                on_output(i, output)  # type: ignore[misc]

        return run_batched(run, lengths, *self._sizes(batch_size), sort=False,
                           on_batch=hand_on if on_output else None, on_event=self.on_event,
                           should_stop=self.should_stop)

    def _check_prompts(self, prompts: list[list[int]], new_tokens: int) -> None:
        """Refuse, before any model time, a prompt that is empty or can't fit the window."""
        room = 0 if self.is_encoder_decoder else new_tokens
        for n, ids in enumerate(prompts):
            if not ids:
                raise UsageError(f"prompt {n + 1} is empty: there is nothing to complete")
            if self.window is not None and len(ids) + room > self.window:
                need = f"{len(ids)} tokens" + (f" + {room} new" if room else "")
                raise ContextOverflowError(
                    f"prompt {n + 1} needs {need}, over the model's {self.window}-token window; "
                    "shorten it or use a smaller --max-new-tokens")

    def _reachable(self, stop: str) -> bool:
        """Whether this tokenizer can produce the stop text; an unreachable one is noted once."""
        if stopping.reachable(self.tokenizer, stop):
            return True
        if stop not in self._noted:
            self._noted.add(stop)
            self.on_event(logging.INFO, f"stop text {stop!r} can never occur with this model's tokenizer "
                                        "(it has no token for it); it is ignored")
        return False

    # -- see inside (llmlab.backends.hf_states): the LM interface's next_logits, embed and model facts

    @property
    def num_layers(self) -> int:
        from llmlab.backends import hf_states

        found = hf_states.num_layers(self.model)
        if found is None:
            raise UsageError(f"{self.name}: its config does not say how many layers it has")
        return found

    @property
    def decoder_start_id(self) -> int | None:
        if not self.is_encoder_decoder:
            return None
        start = getattr(self.model.config, "decoder_start_token_id", None)
        return self.tokenizer.pad_token_id if start is None else start

    def next_logits(self, prompt: Sequence[int], context: Sequence[int]) -> torch.Tensor:
        from llmlab.backends import hf_states

        return hf_states.next_logits(self.model, self.device, self.is_encoder_decoder, prompt, context)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Vector:
        from llmlab.backends import hf_states

        return hf_states.embed(self.model, self.hf_tokenizer, self.device, self.is_encoder_decoder, texts, batch_size)

    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _generate_batch(self, rows: list[list[int]], settings: GenerationSettings, stops: list[str], eos: set[int],
                        stream: Callable[[str], None] | None) -> list[GenOutput]:
        import torch

        ids, mask = hf_score.pad(rows, hf_score.pad_id(self.tokenizer), left=not self.is_encoder_decoder,
                                 device=self.device)
        skip = 1 if self.is_encoder_decoder else ids.shape[1]  # decoder start token / the prompt
        kwargs: _Generate = {**settings.generate_kwargs()}
        if stops:
            kwargs["stopping_criteria"] = stopping.criteria(self.hf_tokenizer, stops, skip)
        kwargs["stopping_criteria"] = stopping.with_stop(kwargs.get("stopping_criteria"), self.should_stop)
        if stream:
            kwargs["streamer"] = stopping.streamer(self.hf_tokenizer, stream, settings.stop)
        cache = prefix_cache.for_generation(self, rows, max(settings.num_beams, settings.num_return_sequences) == 1)
        with torch.inference_mode():  # with a cache that holds the prompt's start, only the rest is run
            out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=self.tokenizer.pad_token_id,
                                      **({self.cache_kwarg(): cache} if cache is not None else {}), **kwargs)
        prefix_cache.remember(self, rows, cache, _PREFIX_MEMO)
        scores = None
        if settings.logprobs:  # generate() returned a dict: the sequences and every step's logits
            scores = hf_score.step_logprobs(out.sequences[:, skip:], out.logits, settings.top_logprobs)
            out = out.sequences
        per = settings.num_return_sequences
        new = out[:, skip:].tolist()  # one device->host copy for the whole batch
        results = []
        for i, row in enumerate(rows):
            span = range(i * per, (i + 1) * per)
            finished = [self._finish(new[k], eos, settings.stop) for k in span]
            output = GenOutput([f[0] for f in finished], len(row), [f[1] for f in finished],
                               [f[2] for f in finished])
            if scores is not None:
                output.logprobs = [self._token_logprobs(new[k], f[1], scores, k) for k, f in zip(span, finished)]
            results.append(output)
        return results

    def _token_logprobs(self, generated: list[int], count: int, scores: tuple[list, list, list],
                        row: int) -> list[TokenLogprob]:
        """The completion's first `count` tokens (its completion_tokens: up to end-of-text, or up to
        the token that completed a stop text), each with its log-probability and top alternatives,
        read from row `row` of `scores`. A token's text is what it adds to the decoded text."""
        chosen, values, ids = scores
        out: list[TokenLogprob] = []
        done = ""  # the decoded text of the tokens so far
        for n, token in enumerate(generated[:count]):
            text = self.tokenizer.decode(generated[: n + 1], skip_special_tokens=True)
            piece = ""
            # A text ending in U+FFFD may be a character split over tokens: it comes with its last
            # token (or with the completion's last token, whatever it decodes to).
            if not text.endswith("\ufffd") or n == count - 1:
                piece, done = text[len(done):], text
            top = [(self.tokenizer.decode([t]), t, v) for t, v in zip(ids[row][n], values[row][n])] if ids else []
            out.append(TokenLogprob(piece, token, chosen[row][n], top))
        return out

    def _finish(self, generated: list[int], eos: set[int], stops: Sequence[str]) -> tuple[str, int, str]:
        """Cut at end-of-text and at the first stop text; count tokens; say why it ended."""
        reason = "length"
        for n, token in enumerate(generated):
            if token in eos:
                generated, reason = generated[:n], "stop"
                break
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cut = cut_at_stop(text, stops)
        if cut is None:
            return text, len(generated), reason
        # Count only the tokens up to the one that completed the stop text.
        used = next((n for n in range(1, len(generated) + 1)
                     if cut_at_stop(self.tokenizer.decode(generated[:n], skip_special_tokens=True),
                                    stops) is not None), len(generated))
        return cut, used, "stop"
