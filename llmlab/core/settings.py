"""Generation settings: defaults, validation and YAML presets. No torch here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, TypedDict

from llmlab.core.errors import UsageError


# --top-logprobs: at most this many alternatives per token (as OpenAI's API allows).
MAX_TOP_LOGPROBS = 20
# Below this a temperature divides the logits into inf/nan (1e-300: "probability tensor contains inf");
# anything this small is greedy in practice: use 0.
MIN_TEMPERATURE = 0.01
MAX_SEED = 2**63 - 1  # torch.manual_seed, numpy and vLLM all take it


class _GenerateKwargs(TypedDict):
    max_new_tokens: int
    do_sample: bool
    num_beams: int
    num_return_sequences: int
    repetition_penalty: float


class GenerateKwargs(_GenerateKwargs, total=False):
    """GenerationSettings.generate_kwargs(): transformers' generate() arguments."""

    output_logits: bool
    return_dict_in_generate: bool
    temperature: float
    top_k: int | None
    top_p: float


@dataclass
class GenerationSettings:
    # max_new_tokens: how many tokens the model may add after the prompt, >= 1.
    max_new_tokens: int = 64
    # do_sample: False = greedy (always the most likely next token, deterministic);
    # True = random sampling from the (reshaped) next-token distribution.
    do_sample: bool = False
    # temperature: 1.0 = the model's distribution unchanged, < 1 sharper (safer), > 1 flatter
    # (more surprising); 0 means greedy. Only used when sampling.
    temperature: float = 1.0
    # top_k: sample only among the k most likely tokens; 0 = no limit. Only used when sampling.
    top_k: int = 0
    # top_p: sample only among the smallest set of tokens whose probabilities sum to p, in (0, 1];
    # 1.0 = no limit (nucleus sampling). Only used when sampling.
    top_p: float = 1.0
    # repetition_penalty: 1.0 = none, > 1 discourages repeating tokens already present, > 0.
    repetition_penalty: float = 1.0
    # num_beams: 1 = no beam search; > 1 keeps that many candidate sequences (slower, often blander).
    num_beams: int = 1
    # num_return_sequences: completions per prompt, >= 1 (needs sampling or num_beams >= it).
    num_return_sequences: int = 1
    # seed: makes sampling reproducible run to run; None = a fresh random draw each run.
    seed: int | None = None
    # stop: the completion is cut before the first of these texts, and generation stops there.
    stop: list[str] = field(default_factory=list)
    # logprobs: also report each completion token's log-probability (JSONL "logprobs"; coloured by
    # probability on a terminal). top_logprobs: and the N most likely tokens at each step, 0..20
    # (> 0 implies logprobs).
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> "GenerationSettings":
        def bad(option: str, value: object, rule: str) -> UsageError:
            return UsageError(f"invalid {option} {value!r}: must be {rule}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("--max-new-tokens", self.max_new_tokens, "an integer >= 1")
        if not _number(self.temperature) or self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise bad("--temperature", self.temperature, f"0 (greedy) or >= {MIN_TEMPERATURE} (1 = unchanged; "
                      "smaller values overflow the logits)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("--top-k", self.top_k, "an integer >= 0 (0 = no limit)")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("--top-p", self.top_p, "in (0, 1] (1 = no limit)")
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("--repetition-penalty", self.repetition_penalty, "> 0 (1 = none)")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise bad("--num-beams", self.num_beams, "an integer >= 1")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise bad("--num-return-sequences", self.num_return_sequences, "an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise bad("--seed", self.seed, f"an integer from 0 to {MAX_SEED} (2^63 - 1)")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise UsageError("invalid --stop: stop texts must be non-empty strings")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", self.logprobs, "true or false")
        if not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool) \
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("--top-logprobs", self.top_logprobs, f"an integer from 0 to {MAX_TOP_LOGPROBS}")
        if self.top_logprobs:
            self.logprobs = True
        if self.logprobs and self.num_beams > 1:
            raise UsageError("--logprobs reports the tokens of greedy or sampled decoding, not of beam search; "
                             "use --num-beams 1")
        if self.temperature == 0:
            self.do_sample = False
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise UsageError(
                f"--num-return-sequences {self.num_return_sequences} needs --sample "
                f"or --num-beams >= {self.num_return_sequences}: greedy decoding has one answer"
            )
        return self

    def generate_kwargs(self) -> GenerateKwargs:
        """Keyword arguments for transformers' generate(): sampling knobs only when sampling."""
        kwargs: GenerateKwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.logprobs:  # the raw logits of every step, to read each token's log-probability
            kwargs["output_logits"], kwargs["return_dict_in_generate"] = True, True
        if self.do_sample:
            kwargs["temperature"], kwargs["top_k"], kwargs["top_p"] = self.temperature, self.top_k or None, self.top_p
        return kwargs


FIELDS = [f.name for f in dataclasses.fields(GenerationSettings)]
_ALIASES = {"sample": "do_sample", "max_tokens": "max_new_tokens"}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_keys(raw: Mapping[str, object], source: str) -> dict[str, object]:
    """Accept `max-new-tokens` and `max_new_tokens`, `greedy: true` and `sample: true`. Values are
    checked once merged (build() -> validate())."""
    out: dict[str, object] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = _ALIASES.get(name, name)
        if name == "greedy":
            name, value = "do_sample", not value
        if name not in FIELDS:
            raise UsageError(
                f"{source}: unknown generation setting '{key}' (known: {', '.join(FIELDS)})"
            )
        if name == "stop" and isinstance(value, str):
            value = [value]
        if name in ("temperature", "top_p", "repetition_penalty") and isinstance(value, int):
            value = float(value)
        out[name] = value
    return out


def load_preset(path: Path) -> dict[str, object]:
    """Read a YAML preset of generation settings (the same names as the flags)."""
    from llmlab.core.yamlfile import load_yaml_mapping

    return normalize_keys(load_yaml_mapping(path, "generation preset"), str(path))


def build(*layers: Mapping[str, object]) -> GenerationSettings:
    """Merge layers left to right (later wins; None means 'not given') and validate."""
    merged: dict[str, object] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    sampling_knobs = {"temperature", "top_k", "top_p"} & merged.keys()
    if "do_sample" not in merged and sampling_knobs:
        # Asking for a temperature, top-k or top-p means asking for sampling.
        merged["do_sample"] = merged.get("temperature", 1.0) != 0
    settings = GenerationSettings()
    for name, value in merged.items():  # validate() checks each value's type and range
        if name not in FIELDS:
            raise UsageError(f"invalid generation settings: GenerationSettings.__init__() got an unexpected "
                             f"keyword argument '{name}'")
        setattr(settings, name, value)
    return settings.validate()
