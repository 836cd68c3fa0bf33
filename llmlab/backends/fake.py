"""FakeLM: a model that needs no torch, for fast tests of everything above the model boundary
(like `llm`'s MockModel). Completions come from a queue; scores are deterministic; every request
is recorded in `requests`.

    lm = FakeLM(answers=["positive", "negative"])
    monkeypatch.setattr(llmlab.backends.models, "load", lambda *a, **k: lm)
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Callable, Sequence, overload

from llmlab.backends.base import (LM, GenOutput, GenRequest, HoldBack, LLOutput, LLRequest, PromptScores, TokenLogprob,
                                  Tokenizer, Vector, cut_at_stop)

if TYPE_CHECKING:
    import torch

    from llmlab.core.settings import GenerationSettings


class CharTokenizer:
    """One token per character (id = code point + 3): any text encodes, counts are predictable.
    0 is padding, 1 end of text, 2 beginning of text (added to untemplated text when bos=True)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    pad_token, eos_token = "<pad>", "</s>"

    def __init__(self, chat_template: str | None = None, bos: bool = False, model_max_length: int = 4096):
        self.chat_template = chat_template
        self.bos = bos
        self.model_max_length = model_max_length

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return ([self.bos_token_id] if self.bos and add_special_tokens else []) + [ord(c) + 3 for c in text]

    @overload
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]: ...
    @overload
    def __call__(self, text: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]: ...

    def __call__(self, text: str | Sequence[str],
                 add_special_tokens: bool = True) -> dict[str, list[int]] | dict[str, list[list[int]]]:
        if isinstance(text, str):
            return {"input_ids": self._ids(text, add_special_tokens)}
        return {"input_ids": [self._ids(t, add_special_tokens) for t in text]}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False, **kwargs: object) -> str:
        return "".join(chr(i - 3) for i in token_ids if i > 2)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        """The vocabulary's name of each id: its character, or the special token's name."""
        names = {self.pad_token_id: self.pad_token, self.eos_token_id: self.eos_token, self.bos_token_id: "<s>"}
        one = lambda i: names.get(i) or chr(i - 3)  # noqa: E731
        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in conversation)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class FakeLM(LM):
    """answers: completions handed out in order (then `default`); score(request) -> log-probability
    (default: a stable hash of context and continuation, so different labels score differently)."""

    def __init__(self, answers: Sequence[str] = (), default: str = "", name: str = "fake",
                 score: Callable[[LLRequest], float] | None = None, window: int | None = 4096,
                 tokenizer: Tokenizer | None = None, is_encoder_decoder: bool = False):
        self.name = name
        self.tokenizer = tokenizer or CharTokenizer(model_max_length=window or 4096)
        self.window = window
        self.device = "cpu"
        self.is_encoder_decoder = is_encoder_decoder
        self.model = None
        self.answers = list(answers)
        self.default = default
        self.score = score or self._hash_score
        self.requests: list[GenRequest | LLRequest | list[int]] = []  # everything asked, in order

    @staticmethod
    def _hash_score(request: LLRequest) -> float:
        return -(zlib.crc32(f"{request.context}\x00{request.continuation}".encode()) % 1000) / 100

    num_layers = 2

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        self.requests.extend(requests)
        outputs = [LLOutput(self.score(r), max(1, len(r.continuation))) for r in requests]
        if hidden_layers:
            for r, out in zip(requests, outputs):
                out.hidden = self.hidden(r.context, hidden_layers)
        return outputs

    def prompt_logprobs(self, prompts: Sequence[list[int]], top: int = 1,
                        batch_size: int | None = 16) -> list[PromptScores]:
        """Token k of a prompt scores -(id % 7) / 10 - k / 100; its alternatives are tokens id, id+1, ...
        each 0.5 less likely; after the prompt, the next characters after its last one."""
        out = []
        for ids in prompts:
            self.requests.append(list(ids))
            alts = lambda i, lp: [(chr(i + j - 3), i + j, lp - j / 2) for j in range(max(1, top))]  # noqa: E731
            tokens = [TokenLogprob(chr(i - 3), i, -(i % 7) / 10 - k / 100, alts(i, -(i % 7) / 10 - k / 100))
                      for k, i in enumerate(ids[1:], 1)]
            out.append(PromptScores(tokens, alts(ids[-1] + 1, -0.1)))
        return out

    @staticmethod
    def hidden(context: str, layers: Sequence[int]) -> Vector:
        """A made-up state per layer, readable by a probe: [count of 'good' and of 'bad' in the
        prompt's last two lines (its input), a hash of the whole prompt in [0, 1) (so other
        demonstrations give other states)], times (layer + 1)."""
        import numpy as np

        text = context.rsplit("\n", 2)[-2] if context.count("\n") >= 2 else context
        base = [text.count("good"), text.count("bad"), (zlib.crc32(context.encode()) % 1000) / 1000]
        return np.array([v * (layer + 1) for layer in layers for v in base], dtype=np.float32)

    VOCAB = 260  # CharTokenizer ids of the code points below 257, plus the three special ids

    def next_logits(self, prompt: Sequence[int], context: Sequence[int]) -> torch.Tensor:
        """Made-up logits, a pure function of the context: the id one past the context's last one
        is most likely, then the ids after it (logit -k for the k-th), the rest far behind."""
        import torch

        last = context[-1] if context else 0
        logits = torch.full((self.VOCAB,), -50.0)
        for k in range(8):
            logits[(last + 1 + k) % self.VOCAB] = -float(k)
        return logits

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Vector:
        """Made-up sentence vectors: letter counts a..z of each text, L2-normalized (so texts that share
        letters are near), as float32 numpy rows."""
        import numpy as np

        rows = np.array([[t.lower().count(chr(97 + i)) for i in range(26)] for t in texts], dtype=np.float32)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return (rows / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)

    @staticmethod
    def _logprobs(text: str, top: int) -> list[TokenLogprob]:
        """One token per character; the k-th is given probability 0.9 ** (k + 1), and its
        alternatives are it and the next characters, each 10 times less likely than the one before."""
        tokens = []
        for k, c in enumerate(text):
            lp = (k + 1) * math.log(0.9)
            alts = [(chr(ord(c) + j), ord(c) + 3 + j, lp - j * math.log(10)) for j in range(top)]
            tokens.append(TokenLogprob(c, ord(c) + 3, lp, alts))
        return tokens

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        """The next queued answer per request (and per return sequence), cut to max_new_tokens
        characters and before a stop text; on_output is called per input, in order."""
        outputs = []
        for i, request in enumerate(requests):
            self.requests.append(request)
            texts, counts, reasons = [], [], []
            for _ in range(settings.num_return_sequences):
                answer = self.answers.pop(0) if self.answers else self.default
                text = answer[: settings.max_new_tokens]
                cut = cut_at_stop(text, settings.stop)
                reasons.append("stop" if cut is not None or len(answer) <= settings.max_new_tokens else "length")
                texts.append(text if cut is None else cut)
                counts.append(len(texts[-1]))
            output = GenOutput(texts, len(self.token_ids(request.prompt, request.templated)), counts, reasons)
            if settings.logprobs:
                output.logprobs = [self._logprobs(text, settings.top_logprobs) for text in texts]
            if stream and len(requests) == 1:
                hold = HoldBack(settings.stop)
                for piece in list(answer[: settings.max_new_tokens]) + [""]:
                    sent = hold.feed(piece, end=piece == "")
                    if sent:
                        stream(sent)
            outputs.append(output)
            if on_output:
                on_output(i, output)
        return outputs
