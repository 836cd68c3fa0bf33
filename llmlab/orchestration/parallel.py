"""Data-parallel evaluation over processes, with torch.distributed (no scheduler of our own).

Every process loads the whole model (one per GPU, or several on a CPU), builds the SAME prompts
and shots (they depend on the template, the seed and the demonstration pool, never on the
process), and scores its share of the items: item i goes to process i mod N. The shares are then
gathered, put back in input order, and every process holds the full results; only process 0
(the main one) prints the table and writes the report. Metrics come from the full, ordered list,
so they are the same for any number of processes.

Processes come from a launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT:
`accelerate launch -m llmlab eval ...`, `torchrun -m llmlab eval ...`, or `llmlab eval
--processes N`, which starts torchrun for you. GPUs talk over NCCL, CPUs over gloo.
Torch is imported only when a run is actually distributed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from typing import Callable, Sequence, TypeVar, cast

from llmlab.core.errors import UsageError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when run alone."""
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1


def size() -> int:
    return world()[1]


def is_main() -> bool:
    return world()[0] == 0


def init() -> None:
    """Join the process group (once): NCCL when this process has a GPU, else gloo. Each process
    takes the GPU of its LOCAL_RANK, so `--device auto` means "my GPU"."""
    if size() == 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def share(items: Sequence[T]) -> list[T]:
    """This process's items: every N-th one, starting at its rank (N = world size). Strided, so
    every process gets a similar mix of short and long items."""
    rank, n = world()
    return list(items[rank::n])


def share_count(total: int) -> int:
    """How many of `total` items this process scores."""
    rank, n = world()
    return len(range(rank, total, n))


def _all_gather(value: T) -> list[T]:
    """value from every process, indexed by rank (any picklable object)."""
    import torch.distributed as dist

    out: list[object] = [None] * size()
    dist.all_gather_object(out, value)
    return cast("list[T]", out)  # every slot now holds one process's value (each a T: they run the same code)


def gather(mine: Sequence[T], total: int) -> list[T]:
    """Every process's share back in input order: item i is element i // N of rank i mod N's share."""
    if size() == 1:
        return list(mine)
    parts = _all_gather(list(mine))
    n = len(parts)
    return [parts[i % n][i // n] for i in range(total)]


def slowest(seconds: float) -> float:
    """The longest of the processes' times: the wall time of a step they ran side by side."""
    return seconds if size() == 1 else max(_all_gather(seconds))


# ---------------------------------------------------------------- llmlab eval --processes N


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_processes(args: Sequence[str]) -> list[str]:
    """The command line without --processes N / --processes=N (the children run alone each)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def launch_command(args: Sequence[str], processes: int) -> list[str]:
    """torchrun (torch.distributed.run) starting `processes` copies of `python -m llmlab ARGS` on
    this machine, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "llmlab", *strip_processes(args)]


# torchrun's own log lines ("W1126 21:01:18.000 ...") and its closing report: not for the user
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_EXIT_CODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def launch(args: Sequence[str], processes: int, write: Callable[[str], object], debug: bool = False) -> int:
    """Run the command in `processes` processes and wait; the exit status of the group (a failed
    process's own status when one failed). The processes' stderr passes through write(); torchrun's
    own log lines and failure report are dropped (kept with debug). CPU threads are divided
    between the processes (OMP_NUM_THREADS) unless already set."""
    if size() > 1:
        raise UsageError("--processes: this already runs under a launcher (WORLD_SIZE is set); drop --processes")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env.setdefault("LOGLEVEL", "ERROR")  # torchrun's own logging
    proc = subprocess.Popen(launch_command(args, processes), env=env, stderr=subprocess.PIPE, text=True)
    report, codes, said = False, [], set()  # said: error lines already passed on (each process says the same)
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            report = report or line.startswith("Traceback (most recent call last)")
            if report or _TORCHRUN_LOG.match(line):
                codes += [int(c) for c in _EXIT_CODE.findall(line)]
                if not debug:
                    continue
            if line.startswith("error:") and not debug:
                if line in said:
                    continue
                said.add(line)
            write(line)
        status = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        return 130
    # torchrun's report lists each failed process's exitcode; the root cause comes last
    return (codes[-1] if codes and codes[-1] > 0 else 1) if status else 0


# Memory a process needs besides the model's weights (python, torch, tokenizer, activations).
PROCESS_OVERHEAD = 1 << 30


def parse_processes(text: str) -> int | str:
    """--processes: a count >= 1, or auto (as many as the items, cores or GPUs and memory allow)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"invalid --processes '{text}': give a count >= 1, or auto") from None
    if n < 1:
        raise UsageError(f"invalid --processes {n}: must be >= 1")
    return n


def available_memory() -> int | None:
    """Bytes of memory available for new processes (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan(asked: int | str, items: int, model_bytes: int | None, cores: int | None = None,
         gpus: int = 0, memory: int | None = None) -> tuple[int, str]:
    """(processes to start, why fewer than asked or "" ): never more than the items (a process with
    none only costs a model copy), the GPUs (one each) or else the CPU cores, and the model copies
    that fit in memory."""
    limits = {f"{items} item{'s' if items != 1 else ''}": max(1, items)}
    if gpus:
        limits[f"{gpus} GPU{'s' if gpus != 1 else ''}"] = gpus
    else:
        cores = cores or os.cpu_count() or 1
        limits[f"{cores} CPU core{'s' if cores != 1 else ''}"] = cores
    if model_bytes and memory is not None:
        fit = max(1, memory // (model_bytes + PROCESS_OVERHEAD))
        limits[f"memory for {fit} model cop{'ies' if fit != 1 else 'y'} of ~{model_bytes / 2**30:.1f} GiB"] = fit
    cap = min(limits.values())
    if isinstance(asked, str):  # auto
        return cap, ""
    if asked <= cap:
        return asked, ""
    why = "; ".join(name for name, n in limits.items() if n == cap)
    return cap, f"--processes {asked}: starting {cap} ({why})"


def check(processes: int, data_paths: Sequence[str], device_map: str | None = None) -> None:
    """--processes N, before any model time: N >= 1, every process must be able to read the data,
    and a device map (one model over all devices) can't be loaded once per process."""
    if processes < 1:
        raise UsageError(f"invalid --processes {processes}: must be >= 1")
    if device_map is not None and (processes > 1 or size() > 1):
        raise UsageError("--device-map spreads one model over all devices, so it can't run once per process; "
                         "use --device-map or several processes, not both")
    if processes > 1 and "-" in data_paths:
        raise UsageError("--processes: each process reads the data itself, so give --data FILE, not stdin")
