"""Learning curves: adapters (`llmlab tune`) beside in-context learning, for k labelled rows and
several seeds, on the same held-out rows. For each (k, seed) it draws the k rows exactly as tune
does (llmlab.tuning.plan.draw), trains one adapter per method on them, then runs ONE
`llmlab eval --adapter a,b,c --probe-data ROWS` on the test file: its in-context row is the
template's defaults (its shots) with the probe fitted on the same k rows, beside one row per
adapter, all on the same items. Every step is an ordinary CLI call (logged in OUT/home's run log,
so `llmlab report` draws the curves), run --jobs at a time with OMP_NUM_THREADS=1, and skipped when
its output already exists: a killed run picks up where it stopped. Prints a markdown table of
accuracy per method and k (mean ± std over seeds; each adapter's paired difference against the
in-context row of its own eval, 95% bootstrap interval), and writes OUT/curves.json.

    OMP_NUM_THREADS=1 python bench/learning_curves.py -t sentiment \\
        --train ../shared/data/sst2/sst2.train.jsonl --test ../shared/data/sst2/sst2.validation.jsonl \\
        --k 16,64,256,1000 --seeds 0,1,2 --methods lora,ia3,prompt --jobs 2 --out /tmp/curves-sst2
    llmlab report $(llmlab runs list --ids ...) --png DIR     # with LLMLAB_HOME=OUT/home
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
LLMLAB = [sys.executable, "-m", "llmlab"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def draw_rows(template: str, train: str, k: int, seed: int, out: Path) -> Path:
    """The k rows tune draws for (k, seed), written as JSONL (the probe's data)."""
    from llmlab.io.records import read_items
    from llmlab.prompting.prompts import find_template
    from llmlab.tuning.plan import draw

    path = out / f"rows-k{k}-s{seed}.jsonl"
    if not path.exists():
        tpl = find_template(template, [])
        items = read_items(train, text_field=tpl.fields[0])
        part = path.with_suffix(".part")  # a run killed mid-write leaves no truncated rows file behind
        with open(part, "w") as f:
            for item in draw(items, tpl, k, seed):
                f.write(json.dumps(item.fields) + "\n")
        os.replace(part, path)
    return path


def run(command: list[str], stdout: Path, env: dict[str, str]) -> float:
    """Run one CLI call (stdout to a file, written only on success); its wall seconds."""
    started = time.perf_counter()
    part = stdout.with_suffix(stdout.suffix + ".part")
    with open(part, "w") as f, open(stdout.with_suffix(".err"), "w") as err:
        code = subprocess.run(command, stdout=f, stderr=err, env=env).returncode
    if code:
        raise RuntimeError(f"exit {code}: {' '.join(command)} (see {stdout.with_suffix('.err')})")
    part.rename(stdout)
    return time.perf_counter() - started


def tune(args: argparse.Namespace, method: str, k: int, seed: int, env: dict[str, str]) -> Path:
    folder = args.out / f"{method}-k{k}-s{seed}"
    record = folder.with_suffix(".json")
    if not record.exists():
        if folder.exists():  # an interrupted training: start it again
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        log(f"tune {method} k={k} seed={seed}")
        wall = run([*LLMLAB, "tune", "-t", args.template, "--data", args.train, "--k", str(k), "--seed", str(seed),
                    "--method", method, "-o", str(folder), "-q", *args.tune_args], record, env)
        log(f"tune {method} k={k} seed={seed}: {wall:.0f} s")
    return folder


def evaluate(args: argparse.Namespace, k: int, seed: int, adapters: list[Path], env: dict[str, str]) -> Path:
    report = args.out / f"eval-k{k}-s{seed}.json"
    if not report.exists():
        rows = draw_rows(args.template, args.train, k, seed, args.out)
        log(f"eval k={k} seed={seed}")
        wall = run([*LLMLAB, "eval", "-t", args.template, "--data", args.test, "--probe-data", str(rows),
                    "--adapter", ",".join(str(a) for a in adapters), "--report", str(report.with_suffix(".tmp")),
                    "-q", *args.eval_args], args.out / f"eval-k{k}-s{seed}.txt", env)
        report.with_suffix(".tmp").rename(report)
        log(f"eval k={k} seed={seed}: {wall:.0f} s")
    return report


def rows_of(report: Path) -> list[dict]:
    """(method, accuracy, versus) per row of one eval report."""
    out = []
    for row in json.loads(report.read_text())["results"]:
        method = row["tuned"]["method"] if row.get("adapter") else "in-context"
        out.append({"method": method, "accuracy": row["summary"]["accuracy"]["mean"],
                    "versus": row.get("cost", {}).get("vs_in_context")})
    return out


def summary(args: argparse.Namespace, reports: dict[tuple[int, int], Path]) -> str:
    table: dict[tuple[str, int], list[dict]] = {}
    for (k, _seed), report in sorted(reports.items()):
        for row in rows_of(report):
            table.setdefault((row["method"], k), []).append(row)
    (args.out / "curves.json").write_text(json.dumps({f"{m}@{k}": v for (m, k), v in table.items()}, indent=1))
    ks = sorted({k for _, k in table})
    methods = ["in-context"] + [m for m in args.methods if any((m, k) in table for k in ks)]
    lines = ["| method | " + " | ".join(f"k {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for method in methods:
        cells = []
        for k in ks:
            runs = table.get((method, k), [])
            if not runs:
                cells.append("-")
                continue
            accs = [100 * r["accuracy"] for r in runs]
            cell = f"{statistics.mean(accs):.1f}" + (f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else "")
            deltas = [r["versus"] for r in runs if r["versus"]]
            if deltas:
                cell += " (Δ " + ", ".join(f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                                           for d in deltas) + ")"
            cells.append(cell + f" n={len(runs)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def schedule(args: argparse.Namespace, grid: list[tuple[int, int]], env: dict[str, str]) -> None:
    """--jobs workers; each takes the first task in grid order whose inputs are ready: a (k, seed)'s
    trainings, then its eval once they are done, so finished cells land as the run goes."""
    tasks: list[tuple[str, int, int]] = [(m, k, s) for k, s in grid for m in [*args.methods, "eval"]]
    done: set[tuple[str, int, int]] = set()
    failed: set[tuple[int, int]] = set()
    cond = threading.Condition()

    def ready(task: tuple[str, int, int]) -> bool:
        m, k, s = task
        return m != "eval" or all((x, k, s) in done for x in args.methods)

    def worker() -> None:
        while True:
            with cond:
                while True:
                    tasks[:] = [t for t in tasks if (t[1], t[2]) not in failed]
                    if not tasks:
                        return
                    task = next((t for t in tasks if ready(t)), None)
                    if task:
                        tasks.remove(task)
                        break
                    cond.wait()
            m, k, s = task
            try:
                if m == "eval":
                    evaluate(args, k, s, [args.out / f"{x}-k{k}-s{s}" for x in args.methods], env)
                else:
                    tune(args, m, k, s, env)
            except RuntimeError as error:
                log(f"failed: {error}")
                with cond:
                    failed.add((k, s))
            with cond:
                done.add(task)
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--template", required=True)
    parser.add_argument("--train", required=True, help="labelled rows the k rows are drawn from")
    parser.add_argument("--test", required=True, help="the held-out rows every eval scores")
    parser.add_argument("--k", default="16,64,256,1000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="lora,ia3,prompt")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tune-args", default="", help="more options for every tune, e.g. '--steps 50'")
    parser.add_argument("--eval-args", default="", help="more options for every eval, e.g. '--sample 2000'")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    args.tune_args, args.eval_args = args.tune_args.split(), args.eval_args.split()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "LLMLAB_HOME": str(args.out / "home")}
    grid = [(int(k), int(s)) for s in args.seeds.split(",") for k in args.k.split(",")]
    if not args.summary_only:
        schedule(args, grid, env)
    reports = {(k, s): args.out / f"eval-k{k}-s{s}.json" for k, s in grid
               if (args.out / f"eval-k{k}-s{s}.json").exists()}
    print(summary(args, reports))


if __name__ == "__main__":
    main()
