"""A bounded load test of `llmlab serve` on loopback: CLIENTS threads send completions back to back
for SECONDS; requests/s, p50/p99 latency and every non-200 answer are reported.

    python bench/serve_load.py --clients 32 --seconds 60          # starts llmlab serve on smollm2
    python bench/serve_load.py --url http://127.0.0.1:8000          # or an already running server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PROMPTS = ["The movie was", "Where is Ganymede?", "A gripping, beautiful film. Sentiment:", "Once upon a time"]


def client(url: str, until: float, max_tokens: int, n: int, out: list) -> None:
    k = n
    while time.perf_counter() < until:
        body = json.dumps({"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}).encode()
        started = time.perf_counter()
        try:
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as reply:
                status = reply.status
                reply.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = type(exc).__name__
        out.append((status, time.perf_counter() - started))
        k += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=1)
    args = parser.parse_args()
    server, url = None, args.url
    if url is None:
        server = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", "-m", args.model, "--port", "0"],
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "LLMLAB_LOG": "0"})
        for line in server.stderr:
            if " at http" in line:
                url = line.split(" at ")[1].split("/v1")[0]
                break
    results: list = []
    until = time.perf_counter() + args.seconds
    threads = [threading.Thread(target=client, args=(url, until, args.max_tokens, n, results))
               for n in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if server is not None:
        server.terminate()
        server.wait(60)
    latencies = sorted(s for status, s in results if status == 200)
    errors = [status for status, _ in results if status != 200]
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None  # noqa: E731
    print(json.dumps({"clients": args.clients, "seconds": round(elapsed, 1), "requests": len(results),
                      "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
                      "requests_per_s": round(len(latencies) / elapsed, 2), "p50_s": pick(0.5), "p99_s": pick(0.99),
                      "max_tokens": args.max_tokens, "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
