"""A one-token `llmlab generate`: cold (the model loads in the command) vs `--server` (a warm
`llmlab serve` on the same model), alternating, each run a fresh process. Wall seconds and CPU
seconds (the command's, plus the server's for --server: on a busy machine CPU time shows the work
that wall time hides).

    python bench/serve_latency.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PROMPT = "Where is Ganymede located in the solar system?"


def cpu_of(pid: int) -> float:
    """user + system CPU seconds of a running process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    env = {**os.environ, "LLMLAB_HOME": tempfile.mkdtemp(prefix="llmlab-home-")}  # its own run log
    llmlab = [sys.executable, "-m", "llmlab"]
    server = subprocess.Popen(llmlab + ["serve", "-m", args.model, "--port", str(args.port)], stderr=subprocess.PIPE,
                              text=True, env=env)
    for line in server.stderr:
        if " at http" in line:
            break
    generate = llmlab + ["generate", PROMPT, "--max-new-tokens", "1", "-m", args.model]
    rows = {"cold": [], "server": []}
    try:
        for _ in range(args.runs):
            rows["cold"].append(timed(generate, env)[:2])
            before = cpu_of(server.pid)
            wall, cpu, _ = timed(generate + ["--server", f"http://127.0.0.1:{args.port}"], env)
            rows["server"].append((wall, cpu, cpu_of(server.pid) - before))
    finally:
        server.terminate()
        server.wait(60)
    result = {"model": args.model, "runs": args.runs, "load_1min": os.getloadavg()[0], "cores": os.cpu_count()}
    for name, runs in rows.items():
        result[name] = {"wall_s": sorted(round(r[0], 2) for r in runs),
                        "cpu_s": sorted(round(sum(r[1:]), 2) for r in runs)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
