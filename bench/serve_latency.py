"""Where a one-token `llmlab generate --server` spends its time, against a warm `llmlab serve` on the
same model. Each of N rounds (--vary: each with a prompt the server has not seen), each a fresh process: `python -c pass` (the machine's own start-up cost
at that moment), the CLI with --server (wall and its CPU seconds), and the same request sent straight
from here over HTTP (the server's share: model work + loopback). Medians, with the load average, so a
figure taken on a busy machine can still be judged: client overhead = CLI wall - HTTP round trip, and
how many bare Python start-ups that overhead is worth. --classify N adds an N-item 4-shot classify
in-process and via --server in the same run (wall ratio; both must write the same records). --cold
adds the in-process one-token generate (the model loads in the command).

    OMP_NUM_THREADS=1 nice python bench/serve_latency.py --runs 5 --classify 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "hi"
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "sst2.validation.jsonl"


def cpu_of(pid: int) -> float:
    """user + system CPU seconds of a running process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of one child process; a failure stops the bench."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def round_trip(url: str, model: str, prompt: str = PROMPT) -> float:
    """The CLI's own request (/v1/generate, one input, one new token), sent from this process."""
    body = {"model": model, "inputs": [{"prompt": prompt}], "settings": {"max_new_tokens": 1}}
    request = urllib.request.Request(url + "/v1/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        reply.read()
    return time.perf_counter() - started


def start_server(llmlab: list[str], model: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(llmlab + ["serve", "-m", model, "--port", "0"], stderr=subprocess.PIPE, text=True,
                              env=env)
    for line in server.stderr:  # type: ignore[union-attr]
        if " at http" in line:
            return server, line.split(" at ")[1].split("/v1")[0]
    raise SystemExit(f"llmlab serve did not start (exit {server.wait()})")


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def classify_pair(llmlab: list[str], model: str, url: str, items: int, env: dict[str, str]) -> dict[str, object]:
    """The same N-item 4-shot classify in-process and via --server: wall seconds and the ratio."""
    out = Path(tempfile.mkdtemp(prefix="llmlab-classify-"))
    command = llmlab + ["classify", "-t", "sentiment", "--shots", "4", "-i", str(SST2), "--limit", str(items),
                        "-m", model, "-q"]
    local = timed(command + ["-o", str(out / "local.jsonl")], env)[0]
    served = timed(command + ["-o", str(out / "served.jsonl"), "--server", url], env)[0]
    same = [json.loads(x)["prediction"] for x in open(out / "local.jsonl")] == \
           [json.loads(x)["prediction"] for x in open(out / "served.jsonl")]
    return {"items": items, "in_process_s": round(local, 2), "server_s": round(served, 2),
            "server_over_in_process": round(served / local, 3), "same_predictions": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--classify", type=int, default=0, metavar="N", help="also time an N-item classify")
    parser.add_argument("--cold", action="store_true", help="also time the in-process one-token generate")
    parser.add_argument("--vary", action="store_true", help="a new prompt each run (the server has seen only "
                        "its chat template's start), instead of the same one each time")
    args = parser.parse_args()
    env = {**os.environ, "LLMLAB_HOME": tempfile.mkdtemp(prefix="llmlab-home-")}  # its own run log
    llmlab = [sys.executable, "-m", "llmlab"]
    server, url = start_server(llmlab, args.model, env)
    generate = llmlab + ["generate", PROMPT, "--max-new-tokens", "1", "-m", args.model]
    rows: dict[str, list[float]] = {k: [] for k in ("python_pass", "cli", "cli_cpu", "server_cpu", "http", "cold")}
    load = [os.getloadavg()[0]]
    try:
        round_trip(url, args.model)  # the server's first request (lazy set-up) is not what a user waits for
        for run in range(args.runs):
            prompt, direct = (f"{PROMPT} {run}", f"hello {run}") if args.vary else (PROMPT, PROMPT)
            rows["python_pass"].append(timed([sys.executable, "-c", "pass"], env)[0])
            before = cpu_of(server.pid)
            wall, cpu, _ = timed(generate[:4] + [prompt] + generate[5:] + ["--server", url], env)
            rows["server_cpu"].append(cpu_of(server.pid) - before)
            rows["cli"].append(wall)
            rows["cli_cpu"].append(cpu)
            rows["http"].append(round_trip(url, args.model, direct))
            if args.cold:
                rows["cold"].append(timed(generate, env)[0])
        classify = classify_pair(llmlab, args.model, url, args.classify, env) if args.classify else None
    finally:
        server.terminate()
        server.wait(60)
    load.append(os.getloadavg()[0])
    result: dict[str, object] = {"model": args.model, "runs": args.runs, "vary": args.vary, "cores": os.cpu_count(),
                                 "load_1min_start_end": load, **{f"{k}_s": median(v) for k, v in rows.items() if v}}
    overhead = statistics.median(c - h for c, h in zip(rows["cli"], rows["http"]))
    result["client_overhead_s"] = round(overhead, 3)  # the CLI's own share: start-up, imports, files, run log
    result["client_overhead_in_python_starts"] = round(overhead / statistics.median(rows["python_pass"]), 1)
    if classify:
        result["classify"] = classify
    print(json.dumps(result))


if __name__ == "__main__":
    main()
