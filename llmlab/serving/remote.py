"""`llmlab lab --server URL`: the served model seen from the client as an LM. The lab runs as
in-process (its state, templates, prompt building, rendering), with the served tokenizer answering
over HTTP (RemoteTokenizer) and the served model completing the prompts' exact texts (RemoteLM).
The standard library talks HTTP (serving.client.post); nothing here imports torch or transformers."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

from llmlab.backends.base import LM, GenOutput, TokenLogprob
from llmlab.core.errors import UsageError
from llmlab.serving.client import post

if TYPE_CHECKING:
    from llmlab.backends.base import GenRequest, LLOutput, LLRequest
    from llmlab.core.config import ModelConfig
    from llmlab.core.settings import GenerationSettings
    from llmlab.learn.nexttoken import Step

_Answer = Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class _Added:
    """What tokens.tokenize reads of an added token: whether it is special."""

    special: bool = True


class RemoteTokenizer:
    """The served model's tokenizer, asked over HTTP; each distinct question is asked once."""

    def __init__(self, url: str, model: ModelConfig):
        self._url, self._model = url, model.spec
        self._answers: dict[str, _Answer] = {}
        facts = self._ask({"op": "facts"})
        self.facts = facts
        self.pad_token_id = _int_or_none(facts["pad_token_id"])
        self.eos_token_id = _int_or_none(facts["eos_token_id"])
        eos = facts["eos_token"]
        self.eos_token = eos if isinstance(eos, str) else None
        template = facts["chat_template"]
        self.chat_template = template if isinstance(template, str) else None
        self.all_special_ids = _ints(facts["all_special_ids"])
        self.added_tokens_decoder = {i: _Added() for i in _ints(facts["special_added_ids"])}

    def _ask(self, body: dict[str, object]) -> _Answer:
        key = json.dumps(body, sort_keys=True)
        if key not in self._answers:
            self._answers[key] = json.loads(post(self._url, "/v1/tokenizer", {"model": self._model, **body}))
        return self._answers[key]

    def __call__(self, text: str, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict[str, list[int]]:
        answer = self._ask({"op": "encode", "text": text, "add_special_tokens": add_special_tokens,
                            "offsets": return_offsets_mapping})
        return {key: list(value) for key, value in answer.items() if isinstance(value, list)}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               *, clean_up_tokenization_spaces: bool | None = None) -> str:
        answer = self._ask({"op": "decode", "ids": [int(i) for i in token_ids],
                            "skip_special_tokens": skip_special_tokens,
                            "clean_up_tokenization_spaces": clean_up_tokenization_spaces})
        return str(answer["text"])

    def convert_ids_to_tokens(self, ids: Union[int, list[int]]) -> Union[str, list[str]]:
        answer = self._ask({"op": "tokens", "ids": [ids] if isinstance(ids, int) else [int(i) for i in ids]})
        tokens = answer["tokens"]
        assert isinstance(tokens, list)  # the server's answer
        return str(tokens[0]) if isinstance(ids, int) else [str(t) for t in tokens]

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        assert not tokenize, "the lab asks for the template's text"
        answer = self._ask({"op": "chat", "messages": conversation, "add_generation_prompt": add_generation_prompt})
        return str(answer["text"])


class RemoteLM(LM):
    """The served model as the lab uses it: its tokenizer, window and name, generate, and /next."""

    def __init__(self, url: str, model: ModelConfig):
        self.url, self.model_spec, self.config = url, model.spec, model
        self.tokenizer = tokenizer = RemoteTokenizer(url, model)
        self.name = str(tokenizer.facts["name"])
        self.window = _int_or_none(tokenizer.facts["window"])
        self.is_encoder_decoder = bool(tokenizer.facts["is_encoder_decoder"])

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        raise UsageError("--server: scoring goes through classify or eval --server")

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        """The completions, done by the server; a stream gets the completion whole when it is done."""
        body = {"model": self.model_spec, "requests": [{"prompt": r.prompt, "templated": r.templated} for r in requests],
                "settings": dataclasses.asdict(settings)}
        outputs = [_output(o) for o in json.loads(post(self.url, "/v1/generate_text", body))["outputs"]]
        for n, output in enumerate(outputs):
            if on_output is not None:
                on_output(n, output)
        if stream is not None and len(outputs) == 1:
            stream(outputs[0].completions[0])
        return outputs

    def walk(self, text: str, templated: bool, settings: GenerationSettings, steps: int, show: int) -> list[Step]:
        """nexttoken.walk over the exact text the model sees (templated: it went through the chat
        template, so it is tokenized without special tokens; else as it is, never wrapped), walked
        by the server (/v1/next)."""
        from llmlab.learn.nexttoken import Step
        from llmlab.serving import client

        flags = {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}
        model = dataclasses.replace(self.config, chat=None if templated else "off")
        return [Step.from_json(step) for step in client.next_steps(self.url, model, text, flags, steps, show,
                                                                   templated=templated)]


def _output(data: Mapping[str, object]) -> GenOutput:
    """A GenOutput from the server's dict of one."""
    logprobs = data.get("logprobs")
    rows = None if not isinstance(logprobs, list) else [
        [TokenLogprob(t["text"], t["id"], t["logprob"], [(a, b, c) for a, b, c in t["top"]]) for t in row]
        for row in logprobs]
    return GenOutput(list(data["completions"]), int(data["prompt_tokens"]),  # type: ignore[call-overload]
                     list(data["completion_tokens"]), list(data["finish_reasons"]), rows)  # type: ignore[call-overload]


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _ints(value: object) -> list[int]:
    return [int(i) for i in value] if isinstance(value, list) else []
