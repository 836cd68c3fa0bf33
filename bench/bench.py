"""llmlab benchmark: llmlab's batched, prefix-cached paths against naive per-item loops, in one
process per case, on the same items. Prints items/s or tokens/s, the speed-up ratio, agreement,
peak RSS, model load times and `llmlab --help` wall time. Not a test: machines are noisy, so
every number is compared with a baseline measured in the same run.

    python bench/bench.py                      # all cases, full sizes (about 20 min on 2 cores)
    python bench/bench.py --cases a --limit 100
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
SHARED = Path(os.environ.get("LLMLAB_SHARED", ROOT.parent / "shared")) / "data"  # LLMLAB_SHARED=/work/shared in a worktree


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    return rows[:limit] if limit else rows


def naive_classify(lm, prompts, labels_text):
    """The naive loop: the full prompt, batch 1. Single-token labels: one forward per item and the
    argmax over the label tokens; longer labels: one forward per item and label, summed log-probs."""
    import torch

    conts = [lm.continuation_ids(t) for t in labels_text]
    start = lm.model.config.decoder_start_token_id if lm.is_encoder_decoder else None

    def logprobs(ids, cont):
        with torch.inference_mode():
            if lm.is_encoder_decoder:
                logits = lm.model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[start] + cont[:-1]])).logits[0]
            else:
                logits = lm.model(input_ids=torch.tensor([ids + cont[:-1]])).logits[0, -len(cont):]
        return torch.log_softmax(logits.float(), -1)

    preds = []
    for prompt in prompts:
        ids = lm.token_ids(prompt.text, prompt.chat)  # the whole prompt text, tokenized as a whole
        if all(len(c) == 1 for c in conts):
            last = logprobs(ids, conts[0])[-1]
            scores = [float(last[c[0]]) for c in conts]
        else:
            scores = [float(logprobs(ids, c).gather(-1, torch.tensor(c)[:, None]).sum()) for c in conts]
        preds.append(max(range(len(conts)), key=scores.__getitem__))
    return preds


def case_classify(model: str, data: Path, template: str, shots: int, limit: int | None, batch_size: int) -> dict:
    from llmlab import classify, prompts
    from llmlab.config import ModelConfig, PromptConfig
    from llmlab.io import Item
    from llmlab.session import Session

    # The same session helper as `llmlab classify`: model, chat decision and prompt builder.
    session = Session(ModelConfig(model))
    lm = session.lm
    tmpl = prompts.find_template(template)
    builder = session.builder(tmpl, PromptConfig(template, shots=shots, selection="balanced", seed=0), 1, None)
    rows = load_jsonl(data, limit)
    items = [Item(i, r, f"row {i}") for i, r in enumerate(rows)]
    clf = classify.Classifier(lm, builder, batch_size=batch_size)
    started = time.perf_counter()
    fast = [clf.labels.index(r.prediction) for r in clf.classify(items)]
    fast_s = time.perf_counter() - started
    prompts_ = [builder.build(item, clf.label_tokens) for item in items]
    continuations = clf._continuations(prompts_[0])
    multi = [c for c in continuations if len(lm.continuation_ids(c)) > 1]
    started = time.perf_counter()
    slow = naive_classify(lm, prompts_, continuations)
    slow_s = time.perf_counter() - started
    gold = [clf.labels.index(str(r[tmpl.target])) for r in rows]
    return {
        "items": len(items), "llmlab_items_per_s": len(items) / fast_s, "naive_items_per_s": len(items) / slow_s,
        "speedup": slow_s / fast_s, "agreement": sum(a == b for a, b in zip(fast, slow)) / len(items),
        "accuracy_llmlab": sum(a == g for a, g in zip(fast, gold)) / len(items),
        "accuracy_naive": sum(a == g for a, g in zip(slow, gold)) / len(items),
        "multi_token_labels": multi, "chat": chat, "peak_rss_mb": peak_rss_mb(),
    }


def case_generate(model: str, prompts_text: list[str], max_new_tokens: int, batch_size: int) -> dict:
    from llmlab import models
    from llmlab.generation import chat_text
    from llmlab.session import chat_for
    from llmlab.settings import build

    lm = models.load(model)
    chat = chat_for(lm.tokenizer, None)
    texts = [chat_text(lm.tokenizer, [{"role": "user", "content": p}]) if chat else p for p in prompts_text]
    requests = [models.GenRequest(t, chat) for t in texts]
    settings = build({"max_new_tokens": max_new_tokens})
    started = time.perf_counter()
    fast = lm.generate(requests, settings, batch_size=batch_size)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = [lm.generate([r], settings, batch_size=1)[0] for r in requests]
    slow_s = time.perf_counter() - started
    fast_tokens = sum(o.completion_tokens[0] for o in fast)
    slow_tokens = sum(o.completion_tokens[0] for o in slow)
    differ = [i for i, (a, b) in enumerate(zip(fast, slow)) if a.completions != b.completions]
    return {
        "items": len(requests), "llmlab_tokens_per_s": fast_tokens / fast_s, "naive_tokens_per_s": slow_tokens / slow_s,
        "speedup": (fast_tokens / fast_s) / (slow_tokens / slow_s),
        "agreement": 1 - len(differ) / len(requests), "differing_items": differ, "peak_rss_mb": peak_rss_mb(),
    }


def flan_t5_small(folder: Path) -> str:
    """A random-weight model shaped like FLAN-T5-small, with the genuine T5 tokenizer."""

    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config.from_json_file(str(SHARED / "flan-t5-config" / "flan-t5-small.config.json"))
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(SHARED / "t5-tokenizer")).save_pretrained(folder)
    return str(folder)


def run_case(name: str, args: argparse.Namespace) -> dict:
    if name == "a":
        return case_classify("smollm2", SHARED / "sst2" / "sst2.validation.jsonl", "sentiment", 4, args.limit, 32)
    if name == "b":
        rows = load_jsonl(SHARED / "dialogsum" / "dialogsum.test.jsonl", min(args.limit or 64, 64))
        prompts_text = [f"Summarize the following conversation.\n\n{r['dialogue']}\n\nSummary:" for r in rows]
        return case_generate("smollm2", prompts_text, 50, 16)
    if name == "c":
        with tempfile.TemporaryDirectory() as tmp:
            model = flan_t5_small(Path(tmp) / "flan-t5-small-random")
            result = {"classify": case_classify(model, SHARED / "sst2" / "sst2.validation.jsonl", "sentiment", 4,
                                                args.limit or 872, 32)}
            rows = load_jsonl(SHARED / "dialogsum" / "dialogsum.test.jsonl", min(args.limit or 64, 64))
            prompts_text = [f"Summarize the following conversation.\n\n{r['dialogue']}" for r in rows]
            result["generate"] = case_generate(model, prompts_text, 50, 16)
            return result
    raise SystemExit(f"unknown case {name}")


def timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def startup(args: argparse.Namespace) -> dict:
    """`llmlab --help` wall time; cold (GGUF conversion) and cached smollm2 load + 1 token, wall."""
    llmlab = [sys.executable, "-m", "llmlab"]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        env["LLMLAB_CACHE"] = cache
        one_token = llmlab + ["generate", "Hi", "--max-new-tokens", "1"]
        helps = [timed(llmlab + ["--help"], env) for _ in range(3)]
        cold = timed(one_token, env)
        warm = [timed(one_token, env) for _ in range(3)]
    return {"help_s": min(helps), "cold_gguf_run_s": cold, "cached_run_s": min(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="a,b,c,startup", help="comma-separated: a, b, c, startup")
    parser.add_argument("--limit", type=int, default=None, help="items per case (default: the full sizes)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--case-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_only:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(args.case_only, args)))
        return
    results = {}
    for name in args.cases.split(","):
        if name == "startup":
            results[name] = startup(args)
        else:  # each case in its own process, so its peak RSS is its own
            cmd = [sys.executable, __file__, "--case-only", name] + (["--limit", str(args.limit)] if args.limit else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict) -> str:
    lines = ["| case | llmlab | naive loop | ratio | agreement | peak RSS | target |", "|---|---|---|---|---|---|---|"]

    def row(label, c, unit, target):
        rate = "items_per_s" if unit == "items/s" else "tokens_per_s"
        lines.append(f"| {label} | {c['llmlab_' + rate]:.1f} {unit} | {c['naive_' + rate]:.1f} {unit} | "
                     f"{c['speedup']:.1f}x | {c['agreement'] * 100:.1f}% | {c['peak_rss_mb']:.0f} MB | {target} |")

    if "a" in r:
        row(f"(a) classify sentiment 4-shot, SST-2 ({r['a']['items']}), smollm2", r["a"], "items/s",
            ">= 5x, >= 99.5% agree, RSS < 1.5 GB")
    if "b" in r:
        row(f"(b) generate DialogSum ({r['b']['items']}), 50 new tokens, smollm2", r["b"], "tokens/s", ">= 3x")
    if "c" in r:
        row(f"(c) classify 4-shot, FLAN-T5-small shape ({r['c']['classify']['items']})", r["c"]["classify"], "items/s", "")
        row(f"(c) generate, FLAN-T5-small shape ({r['c']['generate']['items']})", r["c"]["generate"], "tokens/s", "")
    if "startup" in r:
        s = r["startup"]
        lines.append(f"| `llmlab --help` | {s['help_s']:.2f} s | | | | | < 0.5 s |")
        lines.append(f"| smollm2 load + 1 token, cached | {s['cached_run_s']:.2f} s | cold (GGUF) {s['cold_gguf_run_s']:.1f} s | | | | < 4 s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
