"""A model's anatomy from its config alone: architecture class, exact parameter counts, shapes,
and what it costs in memory (weights per dtype, KV cache, the course's training estimate).

Parameters are counted by building the model on PyTorch's "meta" device: every tensor gets a
shape but no storage, so even a 70B config costs no memory and no weights are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from llmlab.core.errors import ModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

# Bytes per parameter of each storage type (int4 packs two parameters in a byte).
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# The KV cache stays in a float type when only the weights are quantized (int8/int4 weight-only
# quantization computes in bf16), so those columns use bf16 for the cache.
CACHE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 2.0, "int4": 2.0}
# The course's rule of thumb for full fine-tuning with Adam, on top of the 4 bytes of fp32 weights:
# 8 bytes of optimizer states (two moments) + 4 of gradients + ~8 of activations and temporaries.
TRAINING_EXTRA_BYTES = 20

KINDS = {
    "encoder-only": "understanding text: classification, embeddings, extractive QA; it reads the whole "
                    "input in both directions but does not generate",
    "decoder-only": "generating text: continuation, chat, few-shot prompting; it reads left to right and "
                    "predicts the next token",
    "encoder-decoder": "text-to-text tasks: translation, summarization, instruction following; the encoder "
                       "reads the input both ways, the decoder writes the output",
}


@dataclass
class Stack:
    """A run of identical blocks (transformer layers), e.g. model.layers or decoder.block."""

    name: str
    layers: int
    per_layer: int  # parameters of one block (the most common count; T5's first block has a bit more)
    total: int


@dataclass
class Anatomy:
    name: str
    model_type: str
    model_class: str
    kind: str  # encoder-only, decoder-only or encoder-decoder
    parameters: int  # every distinct parameter once (tied embeddings once)
    embeddings: int  # token (+ position) embeddings and an untied output head
    tied: bool  # the output head shares the input embedding matrix
    stacks: list[Stack]
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    window: int | None
    decoder_layers: int  # layers that keep a KV cache while generating (0 for encoder-only)
    chat_template: bool | None  # None: no tokenizer to tell
    notes: list[str] = field(default_factory=list)

    @property
    def other(self) -> int:
        """Norms, biases, poolers: what is neither embeddings nor in a layer stack."""
        return self.parameters - self.embeddings - sum(s.total for s in self.stacks)

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """Keys and values of one token in every decoder layer: 2 x layers x kv_heads x head_dim."""
        if not (self.decoder_layers and self.kv_heads and self.head_dim):
            return 0.0
        return 2 * self.decoder_layers * self.kv_heads * self.head_dim * bytes_per_value

    def memory(self) -> dict[str, dict[str, float]]:
        """Bytes per storage type: weights, KV cache per token and for a full window, and both together."""
        table = {}
        for dtype, size in DTYPE_BYTES.items():
            per_token = self.kv_bytes_per_token(CACHE_BYTES[dtype])
            # An encoder-decoder also caches the encoder's keys/values per input token for
            # cross-attention: a full window of input plus a full window of output.
            full = per_token * (self.window or 0) * (2 if self.kind == "encoder-decoder" else 1)
            table[dtype] = {"weights": self.parameters * size, "kv_per_token": per_token,
                            "kv_full_window": full, "weights_plus_kv": self.parameters * size + full}
        return table

    def training_bytes(self) -> float:
        return self.parameters * (DTYPE_BYTES["fp32"] + TRAINING_EXTRA_BYTES)

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.name, "model_type": self.model_type, "class": self.model_class, "kind": self.kind,
            "good_for": KINDS[self.kind], "parameters": self.parameters, "embeddings": self.embeddings,
            "tied_embeddings": self.tied, "other": self.other,
            "stacks": [vars(s) for s in self.stacks], "hidden_size": self.hidden_size, "heads": self.heads,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "context_window": self.window, "chat_template": self.chat_template, "memory_bytes": self.memory(),
            "training_bytes": self.training_bytes(), "notes": self.notes,
        }


# ---------------------------------------------------------------- reading the config


def load_config(spec: str | None) -> tuple[PretrainedConfig, dict[str, object], str]:
    """(config, the raw config.json mapping, a display name) for a config file, a model folder,
    a .gguf model, an alias or a Hub id in the local cache. Never reads weights."""
    from llmlab.backends import models

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no config warnings on stderr
    from transformers import AutoConfig

    name = spec or models.DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelError(f"config file '{name}' not found; check the path")
        return _config_from(AutoConfig.from_pretrained, str(path), name), _raw(path), name
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("*.json") if "config" in p.name and "tokenizer" not in p.name)
        if found:
            raise ModelError(f"'{name}' holds no config.json; pass one of its config files: "
                             + ", ".join(str(path / f) for f in found))
    ref = models.resolve_model(name)
    if ref.kind == "gguf":
        cached = models.gguf_cache_dir(ref) / "config.json"
        if cached.is_file():  # the converted copy: same config, read in milliseconds
            return _config_from(AutoConfig.from_pretrained, str(cached.parent), name), _raw(cached), name
        config = _config_from(lambda p: AutoConfig.from_pretrained(p, gguf_file=ref.gguf_file), ref.location, name)
        return config, {}, name
    if ref.kind == "local":
        folder = Path(ref.location)
        if not (folder / "config.json").is_file():
            raise ModelError(f"'{name}' holds a tokenizer but no config.json: nothing to count")
        return _config_from(AutoConfig.from_pretrained, str(folder), name), _raw(folder / "config.json"), name
    try:
        config = AutoConfig.from_pretrained(ref.location, local_files_only=True)
    except (OSError, ValueError):
        raise ModelError(f"the config of '{name}' is not in the local Hugging Face cache; download it once "
                         f"(hf download {ref.location} config.json) or pass a config.json path") from None
    from transformers.utils import cached_file

    raw_path = cached_file(ref.location, "config.json", local_files_only=True)
    return config, _raw(Path(raw_path)) if raw_path else {}, name


def _config_from(loader: Callable[[str], PretrainedConfig], location: str, name: str) -> PretrainedConfig:
    try:
        return loader(location)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read a model config from '{name}': {str(exc).splitlines()[0]}") from exc


def _raw(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def kind_of(config: PretrainedConfig) -> str:
    """Encoder-decoder from the config flag; decoder-only when it has a causal-LM class; else encoder-only."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return "decoder-only"
    if "MaskedLM" in architectures or "ForSequenceClassification" in architectures:
        return "encoder-only"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder-only"  # BERT-like (BERT also has a causal head, but it is an encoder)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder-only"
    return "encoder-only"


def build_on_meta(config: PretrainedConfig, kind: str) -> PreTrainedModel:
    """The model with shapes but no storage: exact parameter counts at no memory cost."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    by_kind: dict[str, list[type[_BaseAutoModelClass]]] = {
        "encoder-decoder": [AutoModelForSeq2SeqLM], "decoder-only": [AutoModelForCausalLM],
        "encoder-only": [AutoModelForMaskedLM, AutoModel]}
    classes = by_kind[kind]
    for n, auto in enumerate(classes):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except ValueError as exc:  # no such head for this architecture: try the bare model
            if n == len(classes) - 1:
                raise ModelError(f"transformers cannot build a '{config.model_type}' model: "
                                 f"{str(exc).splitlines()[0]}") from exc
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- counting


def count(model: PreTrainedModel, raw: Mapping[str, object]) -> tuple[int, int, bool, list[Stack], list[str]]:
    """(total, embeddings, tied, stacks, notes). Tied parameters (one tensor under several names)
    count once. A checkpoint whose config.json says tie_word_embeddings: false keeps its own output
    head even where transformers builds the class tied (T5 in transformers 5), so it is added."""
    import torch.nn as nn

    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and inputs is not None and outputs.weight is inputs.weight
    notes = []
    if tied and raw.get("tie_word_embeddings") is False:
        total += outputs.weight.numel()
        tied = False
        notes.append("the config says tie_word_embeddings: false, so the output head is its own "
                     f"{outputs.weight.shape[0]} x {outputs.weight.shape[1]} matrix (transformers builds "
                     f"{type(model).__name__} tied; a checkpoint with both matrices loads them untied)")
    stacks, in_stack = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            sizes = [sum(p.numel() for p in block.parameters()) for block in module]
            if not sizes[0]:
                continue
            per_layer = max(set(sizes), key=sizes.count)
            stacks.append(Stack(name, len(module), per_layer, sum(sizes)))
            in_stack |= {id(p) for p in module.parameters()}
    seen: set[int] = set()
    embeddings = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters():
                if id(p) not in seen and id(p) not in in_stack:
                    seen.add(id(p))
                    embeddings += p.numel()
    if outputs is not None and (not tied):
        embeddings += outputs.weight.numel()
    return total, embeddings, tied, stacks, notes


def _first(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def inspect(spec: str | None) -> Anatomy:
    """Everything `llmlab info` shows, from the config (and the tokenizer, when there is one)."""
    from llmlab.backends import models

    config, raw, name = load_config(spec)
    kind = kind_of(config)
    model = build_on_meta(config, kind)
    total, embeddings, tied, stacks, notes = count(model, raw)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "d_model", "n_embd")
    heads = _first(text, "num_attention_heads", "num_heads", "n_head")
    kv_heads = _first(text, "num_key_value_heads") or heads
    head_dim = _first(text, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    if kind == "encoder-decoder":
        decoder_layers = _first(text, "num_decoder_layers", "decoder_layers") or _first(text, "num_layers") or 0
    elif kind == "decoder-only":
        decoder_layers = _first(text, "num_hidden_layers", "n_layer", "num_layers") or 0
    else:
        decoder_layers = 0
    return Anatomy(
        name=name, model_type=config.model_type, model_class=type(model).__name__, kind=kind, parameters=total,
        embeddings=embeddings, tied=tied, stacks=stacks, hidden_size=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=_first(text, "vocab_size"), window=models.context_window(config, None),
        decoder_layers=decoder_layers, chat_template=_chat_template(spec), notes=notes,
    )


def _chat_template(spec: str | None) -> bool | None:
    """Whether the model's tokenizer has a chat template; None when there is no tokenizer to ask."""
    from llmlab.backends import models
    from llmlab.core.errors import LlmlabError

    if spec and Path(spec).suffix == ".json":
        return None
    try:
        tokenizer, _, _ = models.load_tokenizer(spec)
    except (LlmlabError, OSError, ValueError):
        return None
    return bool(getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------- showing


def human(n: float, unit: str = "B") -> str:
    """1234567 -> '1.23 MB' (decimal units, as the course counts: 1 GB = 10^9 bytes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def millions(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)" if n >= 1e5 else f"{n:,}"
