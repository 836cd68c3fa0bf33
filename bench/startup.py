"""Start-up cost of short runs: wall and CPU seconds of whole `llmlab` processes.

    python bench/startup.py [--runs 3] [--model smollm2] [--device auto] [COMMAND...]

Runs each command --runs times in a fresh process and prints min/median wall and CPU time.
CPU time (user+sys of the child) is steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "help": ["--help"],
    "prompt render": ["prompt", "render", "sentiment", "--var", "text=x"],
    "generate 1 token": ["generate", "--max-new-tokens", "1", "hi"],
}


def run(args: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"llmlab {' '.join(args)} failed: {done.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", help="the model of `generate 1 token` (default: llmlab's, smollm2)")
    parser.add_argument("--device", help="its --device (default: llmlab's, auto)")
    parser.add_argument("only", nargs="*", help="command names to run (default: all)")
    opts = parser.parse_args()
    COMMANDS["generate 1 token"] += (["-m", opts.model] if opts.model else []) + (
        ["--device", opts.device] if opts.device else [])
    run(COMMANDS["generate 1 token"])  # warm the GGUF cache and the page cache first
    print(f"{'command':<18} {'wall min':>9} {'wall med':>9} {'cpu min':>8} {'cpu med':>8}  (seconds, "
          f"{opts.runs} runs, load {os.getloadavg()[0]:.1f})")
    for name, args in COMMANDS.items():
        if opts.only and name not in opts.only:
            continue
        walls, cpus = zip(*(run(args) for _ in range(opts.runs)))
        print(f"{name:<18} {min(walls):9.2f} {statistics.median(walls):9.2f} "
              f"{min(cpus):8.2f} {statistics.median(cpus):8.2f}", flush=True)


if __name__ == "__main__":
    main()
