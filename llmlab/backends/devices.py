"""Device and dtype policy: --device and --dtype checked and resolved (auto picks), and the model
size the `--dtype auto` policy looks at. torch is imported inside the functions only."""

from __future__ import annotations

import re
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch as torch_types
    from transformers import PretrainedConfig

    from llmlab.backends.hfutil import ModelClass

from llmlab.core.errors import UsageError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")

# --dtype auto keeps full precision up to this many parameters: float32 weights of at most 4 GB,
# where half precision buys little speed (small models are bound by per-step overheads, not
# FLOPs) and costs accuracy (bf16 cost smollm2 2.8 points of 4-shot SST-2 on an H200).
FP32_MAX_PARAMS = 1_000_000_000


def _mps_available(torch: ModuleType) -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available(torch) else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UsageError(f"invalid --device '{name}': choose {DEVICES}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if name == "mps" and not _mps_available(torch):
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return name


def map_device(max_memory: dict | None) -> str:
    """The device the dtype policy looks at for a device map: a GPU if one may hold weights."""
    import torch

    gpus = torch.cuda.is_available() and (max_memory is None or any(isinstance(k, int) for k in max_memory))
    return "cuda" if gpus else "cpu"


def auto_dtype(device: str, n_params: int | None, bf16_supported: bool = True) -> str:
    """The `--dtype auto` policy, as a dtype name:

    - CPU and MPS: float32 always (half precision is slow or inexact there).
    - CUDA, a model of at most FP32_MAX_PARAMS parameters (smollm2, FLAN-T5 small to large):
      float32, so `auto` scores exactly like `--dtype float32`.
    - CUDA, a bigger model or one whose size is unknown: bfloat16 where the GPU supports it,
      else float16 (T4, V100), to fit memory and use the tensor cores.
    Log-probabilities are summed in float32 whatever the weights' dtype.
    """
    if not device.startswith("cuda"):
        return "float32"
    if n_params is not None and n_params <= FP32_MAX_PARAMS:
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def resolve_dtype(name: str, device: str, n_params: int | None = None) -> torch_types.dtype:
    """The torch dtype for --dtype NAME on DEVICE; `auto` follows auto_dtype (n_params: the
    model's parameter count, see count_parameters)."""
    import torch

    name = (name or "auto").strip().lower()
    if name not in DTYPES:
        raise UsageError(f"invalid --dtype '{name}': choose one of {', '.join(DTYPES)}")
    if name == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        name = auto_dtype(device, n_params, bf16)
    return getattr(torch, name)


def weights_dtype(name: str, device: str, model_class: ModelClass, config: PretrainedConfig) -> torch_types.dtype:
    """resolve_dtype for a model a config describes; its size is counted only when the policy
    needs it (`auto` on a GPU)."""
    needs_size = (name or "auto").strip().lower() == "auto" and device.startswith("cuda")
    return resolve_dtype(name, device, count_parameters(model_class, config) if needs_size else None)


def count_parameters(model_class: ModelClass, config: PretrainedConfig) -> int | None:
    """Parameters of the model a config describes, without weights: built on the meta device."""
    import torch

    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an estimate only; unknown falls back to half precision on GPU
        return None
