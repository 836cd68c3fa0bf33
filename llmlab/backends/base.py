"""The model interface (in the spirit of lm-evaluation-harness's `LM`): requests in, results out,
in the same order. No torch here, so the interface, the request types and the stop-text helpers
import instantly and serve fake backends too."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, TypeAlias, TypedDict

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    import numpy as np
    import numpy.typing as npt
    import torch
    from transformers import PreTrainedTokenizerBase

    from llmlab.core.settings import GenerationSettings

# A float32 numpy array: LLOutput.hidden (one state vector), LM.embed (one row per text).
Vector: TypeAlias = "npt.NDArray[np.float32]"

# on_event(level, message): how a backend reports what the user may want to know (an out-of-memory
# retry, a stop text the tokenizer can never produce). level is a logging level (logging.INFO,
# logging.WARNING). The CLI passes its own; library code never prints.
EventSink = Callable[[int, str], None]
_log = logging.getLogger("llmlab")


def log_event(level: int, message: str) -> None:
    """The default event sink: the standard logging module, logger 'llmlab'."""
    _log.log(level, message)


class Tokenizer(Protocol):
    """What llmlab uses of a tokenizer, above the backends and in them: transformers' tokenizers
    (through as_tokenizer) and the fake backend's CharTokenizer fit it."""

    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def eos_token(self) -> str | None: ...

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, list[int]]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               *, clean_up_tokenization_spaces: bool | None = None) -> str: ...

    def convert_ids_to_tokens(self, ids: int) -> str | list[str]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = ...,
                            add_generation_prompt: bool = False) -> str: ...


def as_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A transformers tokenizer as a Tokenizer. The one cast: transformers annotates decode() as
    `str | list[str]` and apply_chat_template() as str-or-ids for every input kind, but for one list
    of ids decode() returns a str, and apply_chat_template(tokenize=False) returns a str."""
    from typing import cast

    return cast(Tokenizer, tokenizer)


@dataclass
class GenRequest:
    """A prompt to complete. templated: the text already went through the chat template, so it
    carries its own special tokens and the tokenizer adds none."""

    prompt: str
    templated: bool = False


class TopRecord(TypedDict):
    token: str
    id: int
    logprob: float


class TokenRecord(TopRecord, total=False):
    """TokenLogprob.as_record(): a JSONL "logprobs" entry."""

    top_logprobs: list[TopRecord]


@dataclass
class TokenLogprob:
    """One generated token and how likely the model found it: logprob = log P(token | everything
    before it) under the model's own next-token distribution (before temperature, top-k, top-p or a
    repetition penalty reshape it), in (-inf, 0]; 0 = certain. text: the characters this token
    added to the decoded text ("" for the first byte of a character split over two tokens); the
    texts of a completion's tokens join to the completion, plus the stop text that ended it. top: the N most likely tokens at that step,
    most likely first, as (text, id, logprob); empty unless asked for."""

    text: str
    id: int
    logprob: float
    top: list[tuple[str, int, float]] = field(default_factory=list)

    def as_record(self) -> TokenRecord:
        rec: TokenRecord = {"token": self.text, "id": self.id, "logprob": self.logprob}
        if self.top:
            rec["top_logprobs"] = [{"token": t, "id": i, "logprob": lp} for t, i, lp in self.top]
        return rec


@dataclass
class GenOutput:
    completions: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    finish_reasons: list[str]  # "stop" (end of text or a stop text) or "length" (max_new_tokens)
    # With settings.logprobs: for each completion, its completion_tokens tokens (up to end of text,
    # or up to the one that completed a stop text) with their log-probabilities; else None.
    logprobs: list[list[TokenLogprob]] | None = None


@dataclass
class LLRequest:
    """Score `continuation` as what follows `context` (the whole prompt text, tokenized as a whole).

    prefix: the start of `context` that many requests share (a few-shot prompt's instruction and
    demonstrations); a hint a backend may use to compute it once. It never changes the result.
    context_ids: the tokenization of `context` if the caller already has it (the prompt builder
    counted it), so it is not tokenized twice; None = the backend tokenizes.
    For compatibility `context` may also be a sequence of pieces: they are joined, and the first
    piece becomes the prefix."""

    context: str
    continuation: str
    templated: bool = False
    prefix: str = ""
    context_ids: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.context, str):
            pieces = list(self.context)
            self.context = "".join(pieces)
            self.prefix = self.prefix or (pieces[0] if pieces else "")
        if not self.context.startswith(self.prefix):
            raise ValueError("LLRequest.prefix must be the start of the context")


@dataclass
class LLOutput:
    logprob: float  # sum of the continuation tokens' log-probabilities, <= 0
    tokens: int  # how many tokens the continuation has
    greedy: bool = False  # True when every continuation token was the argmax
    # Asked for with loglikelihood(hidden_layers=[...]): the model's hidden states where the
    # continuation's first token is predicted (the last context token; an encoder-decoder's first
    # decoder position), the asked layers concatenated: a float32 numpy vector [layers x hidden].
    hidden: Vector | None = field(default=None, repr=False)


@dataclass
class PromptScores:
    """How likely the model finds a prompt it is given as token ids: tokens[k] is prompt token k + 1
    with log P(token | the tokens before it) and its `top` alternatives (the first token has no
    context, so it has no entry); next: the `top` most likely tokens after the whole prompt, most
    likely first, as (text, id, logprob). What an OpenAI `echo` + `logprobs` completion reports."""

    tokens: list[TokenLogprob]
    next: list[tuple[str, int, float]]


class Cancelled(Exception):
    """The work was stopped because nobody wants it any more (LM.should_stop said so)."""


class LM(ABC):
    """What every command needs from a model. Subclasses set name, tokenizer, window (tokens the
    model can attend to, or None), device and is_encoder_decoder."""

    name: str
    tokenizer: Tokenizer
    window: int | None
    device: str = "cpu"
    is_encoder_decoder: bool = False
    on_event: EventSink = staticmethod(log_event)
    # Set by whoever runs the model for someone who may leave (llmlab serve's batcher): True once the
    # work is wanted no more. Backends check it between batches and, generating, between steps.
    should_stop: Callable[[], bool] | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def token_ids(self, text: str, templated: bool = False) -> list[int]:
        """The prompt's token ids as the model sees them (templated text adds no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])

    def continuation_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @abstractmethod
    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        """log P(continuation | context) for each request, in request order. hidden_layers:
        indices into (embeddings, layer 1, ..., last layer) whose states each LLOutput.hidden holds;
        a backend that cannot read hidden states raises UsageError."""

    @property
    def num_layers(self) -> int:
        """How many transformer layers the hidden states come from (the decoder's, for T5)."""
        raise UsageError(f"{self.name}: this backend does not give hidden states")

    @property
    def decoder_start_id(self) -> int | None:
        """The token an encoder-decoder's decoder starts from (None for decoder-only models)."""
        return None

    def eos_ids(self) -> set[int]:
        """Token ids that end a generation."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return set() if eos is None else {eos}

    def next_logits(self, prompt: Sequence[int], context: Sequence[int]) -> torch.Tensor:
        """Raw logits over the vocabulary (a float32 torch tensor) for the token after `context`
        (decoder-only: the whole sequence; encoder-decoder: `prompt` feeds the encoder, `context` is
        the decoder's input so far)."""
        raise UsageError(f"{self.name}: this backend does not give next-token logits; use --backend hf")

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Vector:
        """(len(texts) x hidden) float32 numpy array of L2-normalized mean-pooled last hidden states."""
        raise UsageError(f"{self.name}: this backend does not give hidden states; use --backend hf")

    def prompt_logprobs(self, prompts: Sequence[list[int]], top: int = 1,
                        batch_size: int | None = 16) -> list[PromptScores]:
        """Each prompt's own tokens scored, in request order (see PromptScores); top >= 1."""
        raise UsageError(f"{self.name}: this backend cannot score a prompt's own tokens")

    @abstractmethod
    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        """Complete each request, in request order. on_output(index, output) is called for each
        input as soon as it and every input before it are done; stream(text) receives a single
        request's completion piece by piece. engine (--gen-engine): auto, padded or continuous
        batching, where a backend has several; others ignore it."""


# ---------------------------------------------------------------- stop texts


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """The text before the earliest stop text, or None when none occurs."""
    hits = [text.index(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


class HoldBack:
    """Streams a growing completion while never sending text past a stop text: the last
    (longest stop - 1) characters are held back, since they might be the start of a stop text.
    feed(piece) returns what may be sent now; feed("", end=True) flushes the rest."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.text = ""  # everything received
        self.sent = 0  # characters of self.text already sent, 0 <= sent <= len(text)
        self.stopped = False  # a stop text was seen: nothing more is ever sent
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, piece: str, end: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = cut_at_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            upto = len(cut)
        elif end:
            upto = len(self.text)
        else:
            upto = max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
