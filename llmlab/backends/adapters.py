"""Adapters as models: a PEFT adapter folder (LoRA, IA3, prompt tuning) written by `llmlab tune`,
named on any command as --adapter DIR or -m BASE+DIR. The folder holds PEFT's own files plus
RECORD, llmlab's account of how it was trained (base model, template, data hash, k, seed, method,
settings, trainable parameters, training time). Loading checks the base first (its config, before
any weights), then puts the adapter on it: LoRA and IA3 are merged into the weights (so scoring and
generation run the plain model, at the base's speed), prompt tuning stays a PeftModel. peft and
torch are imported inside functions only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypedDict

from llmlab.backends.base import LM, GenOutput, GenRequest, LLOutput, LLRequest
from llmlab.backends.hf import HFLM
from llmlab.core.errors import ModelError
from llmlab.core.jsontypes import JSONValue

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from llmlab.backends.hfutil import Model

    from llmlab.core.settings import GenerationSettings



class Record(TypedDict, total=False):
    """An adapter's RECORD (llmlab_adapter.json), as tuning.checkpoint writes it (older ones may lack keys)."""

    base: str
    base_shape: dict[str, JSONValue]  # shape() of the base
    method: str
    template: str
    task: str
    target: str
    shots: int
    chat: bool | None
    data: str
    data_sha256: str
    k: int
    seed: int
    train_rows: int
    held_out_rows: int
    settings: dict[str, JSONValue]  # rank, alpha, lr, steps... as given to `llmlab tune`
    trainable_params: int
    base_params: int
    train_seconds: float
    train_cpu_seconds: float  # every thread's CPU time: the cost whatever else shared the machine
    steps_done: int
    best_step: int | None
    held_out_loss: float | None
    held_out_accuracy: float | None
    last_train_loss: float | None
    status: str
    llmlab: str
    peft: str

RECORD = "llmlab_adapter.json"
METHODS = ("lora", "ia3", "prompt")
# config keys that say whether two models have the same shape (the adapter's weights fit only that)
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "d_model", "num_hidden_layers", "num_layers",
               "intermediate_size", "d_ff", "num_attention_heads", "num_heads", "num_key_value_heads")


def require_peft() -> None:
    """One line when peft is missing (it is an extra: pip install 'llmlab[tune]')."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ModelError("adapters need the peft package: pip install 'llmlab[tune]' (or pip install peft)")


def join(model: str | None, adapter: str | None) -> str | None:
    """--adapter DIR on top of -m BASE: the spec BASE+DIR (the default base is smollm2)."""
    if not adapter:
        return model
    if model and "+" in model and not Path(model).exists():
        raise ModelError(f"-m '{model}' already names an adapter; give either -m BASE+DIR or --adapter DIR")
    from llmlab.backends.modelspec import DEFAULT_MODEL

    return f"{model or DEFAULT_MODEL}+{adapter}"


def split(spec: str | None) -> tuple[str | None, str | None]:
    """(base spec, adapter folder or None) of a model spec; BASE+DIR splits at its last '+'
    (a path that exists as written is never split)."""
    if not spec or "+" not in spec or Path(spec).exists():
        return spec, None
    base, _, adapter = spec.rpartition("+")
    return (base or None), adapter


def read_record(folder: str | Path) -> Record:
    """The llmlab record of an adapter folder; one line when the folder is missing or is not one."""
    require_peft()
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"adapter folder '{folder}' not found; train one with `llmlab tune ... -o {folder}`")
    if not (path / RECORD).is_file() or not (path / "adapter_config.json").is_file():
        raise ModelError(f"'{folder}' is not an llmlab adapter (no {RECORD} and adapter_config.json in it); "
                         "give a folder written by `llmlab tune`")
    try:
        record: Record = json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"adapter '{folder}': {RECORD} is unreadable ({exc}); train it again") from exc
    return record  # llmlab's own file (json.loads gives no type): trusted to hold what Record says


def shape(config: PretrainedConfig | JSONValue) -> dict[str, JSONValue]:
    """The facts of a model config an adapter depends on (a dict or a config object)."""
    get: Callable[[str], JSONValue] = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return {k: get(k) for k in _SHAPE_KEYS if get(k) is not None}


def base_shape(lm: HFLM) -> dict[str, JSONValue]:
    """shape() of the model an LM runs."""
    return shape(lm.model.config)


def check_base(record: Record, config: PretrainedConfig, base_name: str, folder: str) -> None:
    """Refuse a base whose shape differs from the one the adapter was trained on (before weights)."""
    trained = record.get("base_shape") or {}
    here = shape(config)
    differ = [k for k in _SHAPE_KEYS if trained.get(k) != here.get(k)]
    if differ:
        raise ModelError(f"adapter '{folder}' was trained on '{record.get('base')}', not '{base_name}' "
                         f"({differ[0]} {trained.get(differ[0])} vs {here.get(differ[0])}): "
                         f"use -m {record.get('base')}+{folder}")


def attach(model: Model, folder: str, record: Record) -> Model:
    """The base model with the adapter on it: LoRA and IA3 merged into the weights, prompt tuning
    as PEFT's wrapper (its virtual tokens go in front of every input)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, folder)
    peft_model.eval()
    if record.get("method") == "prompt":
        import warnings

        # generate() hands position ids that PEFT drops (one row per pass: none are needed)
        warnings.filterwarnings("ignore", message="Position ids are not supported", module="peft")
        return _as_model(peft_model)
    return _as_model(peft_model.merge_and_unload())


def _as_model(model: object) -> Model:
    """peft types its results as torch modules: merge_and_unload() returns the base model itself, and
    a PeftModel forwards every attribute it lacks to the model it wraps, so both serve as one."""
    from typing import cast

    return cast("Model", model)


class PromptTunedLM(HFLM):
    """A prompt-tuned model: PEFT puts the virtual tokens first, so a row must have no padding
    before its real tokens and no cached prefix. Scoring batches only rows of one width (no padding
    at all; a prompt's single-token labels share one input); generation runs one row per pass."""

    gen_engine = "padded"
    reuse_prompts = False  # nor a remembered prompt's start when generating

    def loglikelihood(self, requests: Sequence[LLRequest], batch_size: int | None = 16,
                      prefix_cache: bool = True, hidden_layers: Sequence[int] | None = None) -> list[LLOutput]:
        from llmlab.backends import hf_score
        from llmlab.backends.batching import run_batched

        if hidden_layers:  # states are read at positions counted without the virtual tokens: one row per pass
            return super().loglikelihood(requests, 1, False, hidden_layers)
        rows = self.encode_pairs(requests)
        self._check_rows(requests, rows)
        widths: dict[int, list[int]] = {}  # input width (context + continuation[:-1]) -> its rows
        for i, (ctx, cont) in enumerate(rows):
            widths.setdefault(len(ctx) + len(cont) - 1, []).append(i)
        results: list[LLOutput] = [LLOutput(0.0, 0)] * len(rows)
        for width, members in widths.items():
            scored = run_batched(lambda b: hf_score.causal(self, [rows[members[k]] for k in b]),
                                 [width] * len(members), *self._sizes(batch_size), on_event=self.on_event,
                                 should_stop=self.should_stop)
            for i, out in zip(members, scored):
                results[i] = out
        return results

    def generate(self, requests: Sequence[GenRequest], settings: GenerationSettings, batch_size: int | None = 8,
                 on_output: Callable[[int, GenOutput], None] | None = None,
                 stream: Callable[[str], None] | None = None, engine: str = "auto") -> list[GenOutput]:
        return super().generate(requests, settings, 1, on_output, stream, self.gen_engine)  # one row per pass


def lm_class(record: Record | None) -> type[HFLM]:
    return PromptTunedLM if record and record.get("method") == "prompt" else HFLM


def parameter_count(lm: LM) -> int | None:
    """Parameters of the model an LM runs (None for a backend without a torch model, e.g. FakeLM)."""
    model = getattr(lm, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return sum(p.numel() for p in model.parameters())


def size_bytes(folder: str | Path) -> int:
    """Bytes of the adapter's weights on disk."""
    return sum(p.stat().st_size for p in Path(folder).glob("adapter_model.*") if p.is_file())


def find(root: str | Path) -> list[tuple[Path, Record]]:
    """Every adapter folder under `root` (any depth), with its record, sorted by path."""
    found = []
    for record_path in sorted(Path(root).rglob(RECORD)):
        try:
            found.append((record_path.parent, read_record(record_path.parent)))
        except ModelError:
            continue
    return found
