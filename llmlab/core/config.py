"""Typed command configurations: what each command was asked to do, checked before any model time.

The CLI parses options into these dataclasses and hands one of them to one library function
(session.generate, session.classify, evaluate.run, session.render). No torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, TypeVar, overload

from llmlab.core.errors import UsageError


# ---------------------------------------------------------------- the choices, one place each
# str-valued enums: typer shows their values as [a|b|c] in --help and rejects anything else
# before a command runs.


class ChatMode(str, enum.Enum):
    auto = "auto"  # wrap prompts in the chat template when the tokenizer has one
    on = "on"
    off = "off"


class Selection(str, enum.Enum):
    first = "first"
    random = "random"
    balanced = "balanced"
    similar = "similar"  # the k pool examples nearest to each input (llmlab.prompting.retrieval; tf-idf)
    similar_tfidf = "similar-tfidf"
    similar_hidden = "similar-hidden"  # nearest by the loaded model's mean-pooled hidden states


class ShotFormat(str, enum.Enum):
    turns = "turns"
    inline = "inline"


class Overflow(str, enum.Enum):
    drop_shots = "drop-shots"
    truncate = "truncate"
    error = "error"


class Method(str, enum.Enum):
    score = "score"
    generate = "generate"


class TuneMethod(str, enum.Enum):
    lora = "lora"
    ia3 = "ia3"
    prompt = "prompt"  # prompt tuning (Lester et al. 2021)


class Normalize(str, enum.Enum):
    none = "none"
    length = "length"


class InputFormat(str, enum.Enum):
    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"
    text = "text"


class OutputFormat(str, enum.Enum):
    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    text = "text"


class Dtype(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Backend(str, enum.Enum):
    hf = "hf"  # transformers + torch (llmlab.backends.hf)
    vllm = "vllm"  # vLLM on CUDA GPUs (llmlab.backends.vllm)


class GenEngine(str, enum.Enum):
    auto = "auto"  # the engine measured faster on this kind of device (llmlab.backends.hf_continuous.AUTO)
    padded = "padded"  # model.generate on left-padded batches
    continuous = "continuous"  # model.generate_batch: continuous batching, paged attention, greedy only


def plural(n: int, word: str) -> str:
    """'1 shot', '4 shots', '0 shots'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


_Row = TypeVar("_Row")


@overload
def value(choice: enum.Enum | str) -> str: ...
@overload
def value(choice: enum.Enum | str | None) -> str | None: ...


def value(choice: enum.Enum | str | None) -> str | None:
    """An enum member's string (or None / a plain value unchanged). Every option enum here is a str enum."""
    return str(choice.value) if isinstance(choice, enum.Enum) else choice


# ---------------------------------------------------------------- the pieces


@dataclass
class ModelConfig:
    spec: Optional[str] = None  # hub id, folder, .gguf or alias; None = smollm2
    device: str = "auto"
    dtype: str = "auto"
    chat: Optional[str] = None  # auto/on/off; None = the template's, else auto
    device_map: Optional[str] = None  # accelerate strategy (llmlab.backends.placement.STRATEGIES); None = all on device
    max_memory: Optional[dict] = None  # {gpu index or 'cpu': bytes}, with device_map only
    backend: str = "hf"  # hf or vllm
    tensor_parallel_size: int = 1  # vllm: GPUs per layer, >= 1


@dataclass
class PromptConfig:
    template: Optional[str] = None  # name or .yaml path; None = plain prompts
    shots: int | None = None  # demonstrations per prompt, >= 0; None: the template's `shots:` (else 0)
    selection: Optional[str] = None  # None = balanced for classify templates, else first
    seed: Optional[int] = None  # shot draw seed; None = 0
    shot_format: Optional[str] = None  # None = the template's, else turns
    overflow: str = "drop-shots"
    examples: Optional[str] = None  # another demonstration pool
    prompts_dir: list[str] = field(default_factory=list)
    vars: list[str] = field(default_factory=list)  # --var field=value for one input


@dataclass
class InputConfig:
    path: Optional[str] = None  # None = one prompt from the argument or stdin
    format: str = "auto"
    field: str = "prompt"  # the prompt field of plain (template-less) inputs
    offset: int = 0  # skip this many rows first, >= 0
    limit: Optional[int] = None  # then use at most this many, >= 1


@dataclass
class OutputConfig:
    path: Optional[str] = None  # None = stdout
    format: str = "auto"
    resume: bool = False

    @property
    def terminal(self) -> bool:
        """No file and no forced format: a person is reading (table or streamed text)."""
        return self.path in (None, "-") and self.format == "auto"


@dataclass
class GenerateConfig:
    model: ModelConfig
    prompt: PromptConfig
    input: InputConfig
    output: OutputConfig
    flags: Mapping[str, object]  # generation settings given as flags (None = not given; checked by settings.build)
    preset: Optional[Path] = None  # --config YAML
    text: Optional[str] = None  # the PROMPT argument (or stdin)
    batch_size: Optional[int] = 8  # None = auto
    echo: bool = False
    gen_engine: str = "auto"  # auto, padded or continuous (GenEngine)


@dataclass
class ClassifyConfig:
    model: ModelConfig
    prompt: PromptConfig
    input: InputConfig
    output: OutputConfig
    text: Optional[str] = None
    method: str = "score"
    normalize: str = "none"
    calibrate: Optional[str] = None  # off, contextual, batch, domain, probe; None: the template's calibrate: (else off)
    ensemble: int = 1  # demonstration draws averaged, >= 1
    batch_size: Optional[int] = 16
    probe: Optional["ProbeConfig"] = None  # --probe-data: what --calibration probe fits on


@dataclass
class OptimizeConfig:
    """`llmlab optimize`: search prompt variants of `template` on part of `data`, then compare the
    winner with the start template once on the held-out rows (`test`, else a `holdout` share of data)."""

    model: ModelConfig
    template: str
    data: str
    output: str
    budget: int  # scored items (variant x row, plus probe rows fitted) the search may spend
    test: Optional[str] = None
    holdout: float = 0.5
    seed: int = 0
    candidates: int = 16  # variants in the first round
    proposals: int = 2  # instructions the loaded model writes
    offset: int = 0
    limit: Optional[int] = None
    batch_size: int = 16
    examples: Optional[str] = None  # the demonstration pool (else the template's examples)
    prompts_dir: list[str] = field(default_factory=list)
    probe_rows: int = 0  # search rows set aside for a probe fitted on them (the "probe data" readout)
    budget_seconds: float = 0.0  # --budget as a time: the search's seconds (then `budget` is worked out from it)
    proposer: Optional[ModelConfig] = None  # the model that writes the proposed instructions (None: the searched one)


@dataclass
class EvalConfig:
    """`llmlab eval`: templates (NAME or NAME=DATA) on labeled data, or a --plan file's tasks."""

    templates: list[str]
    data: Optional[str] = None  # --data: for templates given without =DATA
    plan_file: Optional[str] = None
    shots: Optional[str] = None  # counts like 0,1,4; None: each template's shots:, else 0
    seeds: int = 1
    calibration: Optional[str] = None  # a comma list of methods; None: each template's calibrate:, else off
    method: str = "score"
    normalize: str = "none"
    ensemble: int = 1
    probe: Optional["ProbeConfig"] = None
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(None))
    input_format: str = "auto"
    offset: int = 0
    limit: Optional[int] = None
    sample: Optional[int] = None
    sample_seed: int = 0
    references: list[str] = field(default_factory=list)
    max_new_tokens: Optional[int] = None
    batch_size: Optional[int] = 16
    report: Optional[str] = None
    log_samples: bool = False
    adapters: Optional[str] = None  # --adapter a,b: `llmlab tune` folders, a row each beside the others


@dataclass
class ProbeConfig:
    """--calibration probe's training rows: --probe-data FILE (None: the template's probe: file), a
    fixed sample of `size` of them, and the layers read (None = llmlab.scoring.probe's defaults)."""

    data: Optional[str] = None
    size: int = 2000  # labelled rows fitted on: a seeded sample of --probe-data (the CLI's default too)
    layers: Optional[str] = None


@dataclass
class RenderConfig:
    model: ModelConfig
    prompt: PromptConfig
    input: InputConfig
    format: str = "text"  # text or jsonl
    max_new_tokens: Optional[int] = None
    verbose: bool = False  # one token-count line per item instead of a summary


@dataclass
class ServeConfig:
    """`llmlab serve`: the model, where it listens, and the caps on what one request may ask."""

    model: ModelConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # required unless the host is a loopback address
    max_body_bytes: int = 2_000_000  # a bigger request body gets 413
    max_prompt_tokens: Optional[int] = None  # None: the model's context window
    max_tokens: int = 1024  # most tokens one completion may ask for
    max_n: int = 8  # most completions per prompt
    batch_wait_ms: float = 5.0  # how long a model call waits for requests to merge with

    def prompt_cap(self, window: Optional[int]) -> int:
        caps = [c for c in (self.max_prompt_tokens, window) if c]
        return min(caps) if caps else 10**9


# ---------------------------------------------------------------- checks that need no model


def batch_size(text: str) -> Optional[int]:
    """--batch-size: an integer >= 1, or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"invalid --batch-size '{text}': give an integer >= 1 or auto")
    return size


def check_prompts_dirs(dirs: list[str]) -> None:
    for folder in dirs:
        if not Path(folder).is_dir():
            raise UsageError(f"--prompts-dir '{folder}' is not a folder; give a folder of template .yaml files")


def sample(items: list[_Row], size: Optional[int], seed: int, source: str) -> list[_Row]:
    """--sample N: a fixed seeded sample of the rows, taken before --offset/--limit: the rows
    shuffled with Python's random.Random(seed) and the first N kept, in that shuffled order (each
    keeps its original index). The same as shuffling the file's lines that way and taking N."""
    if size is None:
        return items
    if size < 1:
        raise UsageError(f"invalid --sample {size}: must be >= 1")
    if size > len(items):
        raise UsageError(f"--sample {size}: {source} has only {len(items)} rows; use a smaller --sample")
    import random

    rows = list(items)
    random.Random(seed).shuffle(rows)
    return rows[:size]


def window(items: list[_Row], offset: int, limit: Optional[int], source: str) -> list[_Row]:
    """Rows offset..offset+limit of the input, keeping their original index (so --resume and
    records still say which row each one was)."""
    if offset < 0:
        raise UsageError(f"invalid --offset {offset}: must be >= 0")
    if limit is not None and limit < 1:
        raise UsageError(f"invalid --limit {limit}: must be >= 1")
    if offset and offset >= len(items):
        raise UsageError(f"--offset {offset}: {source} has only {len(items)} rows")
    end = None if limit is None else offset + limit
    return items[offset:end]


@dataclass
class TuneConfig:
    """`llmlab tune`: an adapter trained on k rows of `data` in `template`'s prompt format, written to
    `output` (a folder that must not exist yet). lr None: the method's default."""

    model: ModelConfig
    template: str
    data: str
    output: str
    method: str = "lora"  # lora, ia3 or prompt
    k: int = 64  # labelled rows drawn (balanced by label for classify templates), held-out slice included
    seed: int = 0  # the draw, the held-out split, the initial weights, the batch order
    steps: int = 100  # optimizer steps at most (early stopping may end sooner)
    batch_size: int = 8  # rows per step
    lr: Optional[float] = None
    rank: int = 8  # LoRA
    alpha: int = 16  # LoRA
    virtual_tokens: int = 20  # prompt tuning
    held_out: float = 0.2  # share of the k rows kept out of training to pick the best step
    eval_every: int = 25  # steps between held-out evaluations
    patience: int = 5  # held-out evaluations without improvement before stopping
    target: Optional[str] = None  # generate templates: the field with the text to learn (None: the template's)
    shots: int = 0  # demonstrations in the training prompts (the adapter's runs use the same by default)
    prompts_dir: list[str] = field(default_factory=list)
    input_format: str = "auto"
