"""Placing one model over several devices with accelerate (`--device-map`, `--max-memory`).

transformers' from_pretrained(device_map=..., max_memory=...) asks accelerate for a device map:
which submodule (embedding, each decoder layer, the head) goes to which GPU, to the CPU, or to
disk. The same computation runs here on a model built on the meta device (shapes, no weights), so
`--dry-run` shows the placement and each device's share of the weights before anything loads.
Parsing is torch-free; plan() and input_device() import torch lazily."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from llmlab.backends.hfutil import ModelClass

# Where accelerate puts a module: a GPU index, or "cpu", "disk", "mps", "cuda:1"...
Where: TypeAlias = "int | str | torch.device"

from llmlab.core.errors import UsageError

# accelerate's strategies: auto/balanced spread layers evenly over the GPUs, balanced_low_0 keeps
# GPU 0 light (room for generate()'s buffers), sequential fills GPU 0 first, then 1, ...
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Sizes as accelerate reads them: a number and an optional unit (GiB = 2**30 bytes, GB = 10**9).
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_device_map(text: str | None) -> str | None:
    """--device-map: one of STRATEGIES, or None when not given."""
    if text is None:
        return None
    name = text.strip().lower().replace("-", "_")
    if name not in STRATEGIES:
        raise UsageError(f"invalid --device-map '{text}': choose {', '.join(STRATEGIES)}")
    return name


def size_bytes(text: str) -> int:
    """'20GiB' -> 21474836480; '500MB' -> 500000000; a bare number is bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(text)
    number = re.match(r"\d+(\.\d+)?", text.strip()).group(0)  # type: ignore[union-attr]
    unit = (match.group(2) or "").upper()
    return int(float(number) * _UNITS[unit])


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """--max-memory 0=20GiB,1=20GiB,cpu=64GiB -> {0: bytes, 1: bytes, 'cpu': bytes}: the most
    weight memory each device may hold (GPU by index, cpu, mps). Devices not named get nothing
    when any GPU is named, as in accelerate."""
    if text is None:
        return None
    out: dict[int | str, int] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not (key.isdigit() or key in ("cpu", "mps")):
            raise UsageError(f"invalid --max-memory '{text}': give DEVICE=SIZE pairs like 0=20GiB,cpu=64GiB "
                             "(DEVICE: a GPU index, cpu or mps)")
        try:
            out[int(key) if key.isdigit() else key] = size_bytes(size)
        except ValueError:
            raise UsageError(f"invalid --max-memory size '{size.strip()}' for {key}: give a size like "
                             "20GiB, 512MiB or 8GB") from None
    if not out:
        raise UsageError(f"invalid --max-memory '{text}': give DEVICE=SIZE pairs like 0=20GiB,cpu=64GiB")
    return out


def check(device: str, device_map: str | None, max_memory: dict | None) -> None:
    """Option combinations, before any model time: --device-map places the model itself, so
    --device must stay auto; --max-memory only means something with a device map."""
    if max_memory is not None and device_map is None:
        raise UsageError("--max-memory needs --device-map (e.g. --device-map auto --max-memory 0=20GiB,cpu=64GiB)")
    if device_map is not None and (device or "auto").strip().lower() != "auto":
        raise UsageError(f"--device {device} and --device-map {device_map} both place the model; give only one")
    if max_memory:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for key in max_memory:
            if isinstance(key, int) and key >= gpus:
                raise UsageError(f"--max-memory names GPU {key}, but {gpus} CUDA device(s) are visible")


# ---------------------------------------------------------------- the placement


@dataclass
class Share:
    device: str  # "cuda:0", "cpu", "disk", ...
    modules: list[str]  # top-level names placed there, in model order (e.g. model.layers.0)
    weight_bytes: int  # parameters + buffers placed there
    limit_bytes: int | None  # the --max-memory limit (None: whatever accelerate found free)


def device_name(where: Where) -> str:
    """An accelerate device-map value as a device string: 0 -> cuda:0, 'cpu', 'disk', 'mps'."""
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def shares(device_map: dict[str, Where], module_sizes: dict[str, int], limits: dict | None) -> list[Share]:
    """The device map grouped by device, in the order devices first appear."""
    grouped: dict[str, Share] = {}
    for module, where in device_map.items():
        name = device_name(where)
        key = where if isinstance(where, int) else name
        share = grouped.setdefault(name, Share(name, [], 0, (limits or {}).get(key)))
        share.modules.append(module or "(whole model)")
        share.weight_bytes += module_sizes.get(module, 0)
    return list(grouped.values())


def plan(model_class: ModelClass, config: PretrainedConfig, dtype: torch.dtype, device_map: str,
         max_memory: dict | None) -> list[Share]:
    """How from_pretrained would place the model, computed on a meta-device copy (no weights,
    no memory): the same transformers/accelerate call from_pretrained makes."""
    import torch
    from transformers.integrations.accelerate import _get_device_map, compute_module_sizes

    with torch.device("meta"):
        model = model_class.from_config(config, dtype=dtype)
    placed = _get_device_map(model, device_map, dict(max_memory) if max_memory else None, None)
    sizes, _ = compute_module_sizes(model)
    return shares(placed, sizes, max_memory)


def input_device(device_map: dict[str, Where]) -> str:
    """Where a sharded model's inputs go: accelerate runs CPU- and disk-offloaded modules on the
    first accelerator in the map (its main device), so inputs go there; with no accelerator in
    the map, everything runs on the CPU."""
    for where in device_map.values():
        if device_name(where) not in ("cpu", "disk", "meta"):
            return device_name(where)
    return "cpu"


def human(n: int | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (as --max-memory writes them)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe(name: str, shares_: list[Share]) -> list[str]:
    """The --dry-run lines: one per device, what it holds and how much."""
    lines = [f"{name}: placement by accelerate ({human(sum(s.weight_bytes for s in shares_))} of weights)"]
    for s in shares_:
        held = s.modules if len(s.modules) <= 4 else s.modules[:2] + ["...", s.modules[-1]]
        lines.append(f"  {s.device:<8} {human(s.weight_bytes):>11}  (limit {human(s.limit_bytes)})  "
                     f"{len(s.modules)} module(s): {', '.join(held)}")
    return lines
