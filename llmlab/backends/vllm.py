"""The vLLM backend (`--backend vllm`, `pip install 'llmlab[vllm]'`): the model interface over
`vllm.LLM`, for CUDA GPUs.

- generate: every request goes to vLLM at once (in chunks, so finished outputs are handed on as
  they come); vLLM's scheduler batches continuously, and `--tensor-parallel-size N` splits each
  layer over N GPUs.
- loglikelihood: as lm-evaluation-harness's vLLM backend (lm_eval/models/vllm_causallms.py): one
  "generation" of max_tokens=1 per distinct context+continuation with prompt_logprobs=1, which
  returns, for every prompt position, the log-probability of the prompt's own token (and of the
  most likely one). The continuation's score is the sum over its positions; greedy = its token
  was the most likely at every position.
- Prefix caching: vLLM's V1 engine documented prompt log-probabilities as unsupported with
  automatic prefix caching on (0.8-era user guide), so the engine is built with
  enable_prefix_caching=False: the request's `prefix` hint is not used, every prompt is computed
  whole. (HFLM's own prefix cache has no such limit.)

Only decoder-only models: vLLM's encoder-decoder support (T5) is limited, so those are refused.
vLLM is imported only inside load(); this module imports without it, so the translation between
llmlab's requests and vLLM's objects is tested with a stand-in for vllm.LLM (tests/test_scale_vllm.py).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypedDict

from llmlab.backends.base import (LM, EventSink, GenOutput, GenRequest, LLOutput, LLRequest, TokenLogprob, Tokenizer,
                                  cut_at_stop, log_event)
from llmlab.core.errors import ContextOverflowError, ModelError, UsageError

if TYPE_CHECKING:
    from llmlab.core.config import ModelConfig
    from llmlab.core.settings import GenerationSettings


# What this module reads of vLLM's objects (vllm ships no types, and tests use stand-ins).
class Logprob(Protocol):
    @property
    def logprob(self) -> float: ...
    @property
    def rank(self) -> int | None: ...
    @property
    def decoded_token(self) -> str | None: ...


class Completion(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def logprobs(self) -> Sequence[dict[int, Logprob]] | None: ...


class RequestOutput(Protocol):
    @property
    def outputs(self) -> Sequence[Completion]: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def prompt_logprobs(self) -> Sequence[dict[int, Logprob] | None]: ...


class TokensPrompt(TypedDict):
    """vllm.inputs.TokensPrompt."""

    prompt_token_ids: list[int]


class Engine(Protocol):
    """vllm.LLM, as this module calls it."""

    def generate(self, prompts: list[TokensPrompt], sampling_params: object,
                 use_tqdm: bool = ...) -> list[RequestOutput]: ...

# generate hands this many prompts to vLLM per call: vLLM batches them itself; the chunks only
# bound how much work a Ctrl-C can lose (outputs are handed on after each chunk).
_GEN_CHUNK = 256
# loglikelihood: distinct prompts per vLLM call.
_SCORE_CHUNK = 1024


def check_options(cfg: ModelConfig) -> None:
    """--backend vllm option combinations, before any model time."""
    if cfg.device_map is not None or cfg.max_memory is not None:
        raise UsageError("--device-map/--max-memory are for --backend hf; vLLM places the model itself "
                         "(use --tensor-parallel-size N)")
    if (cfg.device or "auto") not in ("auto", "cuda"):
        raise UsageError(f"--backend vllm runs on CUDA GPUs only; drop --device {cfg.device}")
    if cfg.tensor_parallel_size < 1:
        raise UsageError(f"invalid --tensor-parallel-size {cfg.tensor_parallel_size}: must be >= 1")
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--backend vllm needs vLLM (CUDA GPUs only): pip install vllm, or the llmlab extra 'vllm'")


def engine_args(location: str, dtype: str, tensor_parallel_size: int) -> dict[str, str | int | bool]:
    """Keyword arguments for vllm.LLM."""
    return {"model": location, "dtype": dtype or "auto", "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": False,  # prompt log-probabilities (scoring) need it off; see above
            "seed": 0}


def load(spec: str | None, dtype: str = "auto", tensor_parallel_size: int = 1) -> "VLLM":
    """A vllm.LLM for a hub id or a save_pretrained folder (not a .gguf: convert it first)."""
    from llmlab.backends import loading

    ref = loading.resolve_model(spec)
    if ref.kind == "gguf":
        raise ModelError(f"--backend vllm: '{ref.name}' is a GGUF file; give a hub id or a save_pretrained folder")
    from vllm import LLM  # noqa: PLC0415 - optional, GPU-only

    llm = LLM(**engine_args(ref.location, dtype, tensor_parallel_size))
    tokenizer = llm.get_tokenizer()
    config = llm.llm_engine.model_config
    if getattr(config.hf_config, "is_encoder_decoder", False):
        raise ModelError(f"--backend vllm: '{ref.name}' is an encoder-decoder model; use --backend hf")
    return VLLM(ref.name, llm, tokenizer, config.max_model_len, config=config.hf_config, dtype=config.dtype)


def _prompt(ids: list[int]) -> TokensPrompt:
    """A vLLM token prompt (vllm.inputs.TokensPrompt is this TypedDict)."""
    return {"prompt_token_ids": ids}


def _value(logprob: Logprob | float) -> float:
    """vLLM returns Logprob objects (.logprob); very old versions returned floats."""
    return float(logprob) if isinstance(logprob, (int, float)) else float(logprob.logprob)


def parse_prompt_logprobs(tokens: Sequence[int], prompt_logprobs: Sequence[dict[int, Logprob] | None],
                          ctxlen: int) -> tuple[float, bool]:
    """(sum of the log-probabilities of tokens[ctxlen:], whether each was the most likely).

    prompt_logprobs[j]: {token id: Logprob} for position j of the prompt (None at j = 0: nothing
    precedes it); with prompt_logprobs=1 it holds the prompt's own token and the top-1 token."""
    total, greedy = 0.0, True
    for token, entry in zip(tokens[ctxlen:], prompt_logprobs[ctxlen:]):
        assert entry is not None  # only position 0 has none, and ctxlen >= 1
        values = {t: _value(lp) for t, lp in entry.items()}
        total += values[token]
        if max(values, key=values.__getitem__) != token:
            greedy = False
    return total, greedy


class VLLM(LM):
    """A vllm.LLM behind the model interface (decoder-only models)."""

    is_encoder_decoder = False
    device = "cuda"

    def __init__(self, name: str, llm: Engine, tokenizer: Tokenizer, window: int | None,
                 on_event: EventSink | None = None, sampling_params: Callable[..., object] | None = None,
                 config: object = None, dtype: object = "auto"):
        self.name = name
        self.llm = llm
        # lm.model: what commands read about the model (the report's type and dtype), as on HFLM
        self.model = SimpleNamespace(config=config or SimpleNamespace(model_type=None), dtype=dtype, engine=llm)
        self.tokenizer = tokenizer
        self.window = window
        self.on_event = on_event or log_event
        self._sampling = sampling_params  # vllm.SamplingParams; a stand-in in tests

    def sampling_params(self, **kwargs: object) -> object:
        if self._sampling is None:
            from vllm import SamplingParams

            self._sampling = SamplingParams
        return self._sampling(**kwargs)

    # -- scoring

    def pairs(self, requests: Sequence[LLRequest]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids), split as HFLM and lm-evaluation-harness split them:
        the context's trailing whitespace moves onto the continuation; context + continuation are
        tokenized as a whole and the continuation is what follows the context's own tokens."""
        out = []
        for r in requests:
            n = len(r.context) - len(r.context.rstrip())
            context, cont = r.context[: len(r.context) - n], r.context[len(r.context) - n :] + r.continuation
            ctx = self.token_ids(context, r.templated)
            whole = self.token_ids(context + cont, r.templated)
            out.append((ctx, whole[len(ctx) :]))
        return out

    @property
    def num_layers(self) -> int:
        raise UsageError("--calibration probe reads hidden states, which --backend vllm does not give; "
                         "use --backend hf")

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        """log P(continuation | context) per request, from vLLM's prompt log-probabilities.
        batch_size is ignored (vLLM batches itself); identical inputs are scored once."""
        if hidden_layers:
            self.num_layers  # noqa: B018 - raises: no hidden states here
        rows = self.pairs(requests)
        for (ctx, cont), r in zip(rows, requests):
            if not cont:
                raise UsageError(f"cannot score an empty continuation after {r.context[-30:]!r}")
            if not ctx:
                raise UsageError("cannot score a continuation with an empty context on --backend vllm")
            if self.window is not None and len(ctx) + len(cont) > self.window:
                raise ContextOverflowError(
                    f"a prompt and its label need {len(ctx) + len(cont)} tokens, over the model's "
                    f"{self.window}-token window; use fewer --shots or --overflow drop-shots|truncate")
        inputs: dict[tuple[int, ...], int] = {}
        which = [inputs.setdefault(tuple(ctx + cont), len(inputs)) for ctx, cont in rows]
        distinct = [list(k) for k in inputs]
        params = self.sampling_params(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        outputs: list[RequestOutput] = []
        for start in range(0, len(distinct), _SCORE_CHUNK):
            chunk = distinct[start : start + _SCORE_CHUNK]
            outputs += self.llm.generate([_prompt(ids) for ids in chunk], params, use_tqdm=False)
        results = []
        for (ctx, cont), k in zip(rows, which):
            total, greedy = parse_prompt_logprobs(distinct[k], outputs[k].prompt_logprobs, len(ctx))
            results.append(LLOutput(total, len(cont), greedy))
        return results

    # -- generation

    def generation_params(self, settings: GenerationSettings) -> object:
        """llmlab's generation settings as vllm.SamplingParams (greedy = temperature 0)."""
        if settings.num_beams > 1:
            raise UsageError("--num-beams is not supported with --backend vllm (vLLM's beam search is a separate "
                             "API); use --backend hf")
        sample = settings.do_sample
        return self.sampling_params(
            n=settings.num_return_sequences, max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if sample else 0.0,
            top_k=(settings.top_k or -1) if sample else -1, top_p=settings.top_p if sample else 1.0,
            repetition_penalty=settings.repetition_penalty, seed=settings.seed,
            stop=list(settings.stop) or None, skip_special_tokens=True,
            # logprobs=N: each sampled token's log-probability plus the N most likely (vLLM's
            # default logprobs mode is the raw model distribution, as HFLM reports it)
            **({"logprobs": settings.top_logprobs} if settings.logprobs else {}))

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        """Complete every request; on_output(i, output) in input order after each chunk. stream
        receives a single request's completion in one piece (vLLM's offline API does not stream)."""
        prompts = [self.token_ids(r.prompt, r.templated) for r in requests]
        for n, ids in enumerate(prompts):
            if not ids:
                raise UsageError(f"prompt {n + 1} is empty: there is nothing to complete")
            if self.window is not None and len(ids) + settings.max_new_tokens > self.window:
                raise ContextOverflowError(
                    f"prompt {n + 1} needs {len(ids)} tokens + {settings.max_new_tokens} new, over the model's "
                    f"{self.window}-token window; shorten it or use a smaller --max-new-tokens")
        params = self.generation_params(settings)
        results: list[GenOutput] = []
        for start in range(0, len(prompts), _GEN_CHUNK):
            chunk = prompts[start : start + _GEN_CHUNK]
            for offset, out in enumerate(self.llm.generate([_prompt(ids) for ids in chunk], params, use_tqdm=False)):
                result = self.to_output(out, settings.stop, settings.top_logprobs if settings.logprobs else None)
                results.append(result)
                if on_output:
                    on_output(start + offset, result)
        if stream and len(results) == 1:
            stream(results[0].completions[0])
        return results

    @staticmethod
    def to_output(out: RequestOutput, stops: Sequence[str], top: int | None = None) -> GenOutput:
        """A vLLM RequestOutput as a GenOutput. vLLM already cuts at stop texts (finish_reason
        'stop'); the cut is repeated here for safety on text vLLM decoded differently. top: None,
        or the alternatives per token asked for with --logprobs (0..20)."""
        texts, counts, reasons = [], [], []
        for c in out.outputs:
            cut = cut_at_stop(c.text, stops)
            texts.append(c.text if cut is None else cut)
            counts.append(len(c.token_ids))
            reasons.append("stop" if cut is not None or c.finish_reason == "stop" else "length")
        result = GenOutput(texts, len(out.prompt_token_ids), counts, reasons)
        if top is not None:
            result.logprobs = [token_logprobs(c.token_ids, c.logprobs or [], top) for c in out.outputs]
        return result


def token_logprobs(token_ids: Sequence[int], steps: Sequence[dict[int, Logprob]], top: int) -> list[TokenLogprob]:
    """vLLM's per-step {token id: Logprob(logprob, rank, decoded_token)} (the top `top` tokens by
    rank 1..top, plus the sampled token, which may rank lower) as TokenLogprobs."""
    tokens = []
    for token, step in zip(token_ids, steps):
        ranked = sorted((e.rank, i) for i, e in step.items() if e.rank is not None and e.rank <= top)
        alternatives = [(step[i].decoded_token or "", i, _value(step[i])) for _, i in ranked]
        mine = step[token]
        tokens.append(TokenLogprob(mine.decoded_token or "", token, _value(mine), alternatives))
    return tokens
