"""llmlab benchmark: llmlab's batched, prefix-cached paths against naive per-item loops, in one
process per case, on the same items. Prints items/s or tokens/s, the speed-up ratio, agreement,
peak RSS, model load times and `llmlab --help` wall time. Not a test: machines are noisy, so
every number is compared with a baseline measured in the same run.

    python bench/bench.py                      # all cases, full sizes (about 45 min on 2 cores)
    python bench/bench.py --cases a --limit 100
    python bench/bench.py --cases a,b,e --device cuda --model /root/smollm2.gguf   # a GPU (bench/gpu_check.sh)

Cases: a = classify SST-2 4-shot vs the batch-1 plain-HF loop; b = generate vs one prompt at a time;
c = both on a random-weight FLAN-T5-small shape; e = the two generate engines (padded batches vs
transformers' continuous batching) on the same prompts; startup = `llmlab --help` and load + 1 token.
On CUDA every timer is read after torch.cuda.synchronize(), and the card's name is reported.
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


def device_name(device: str) -> str:
    """What ran the case: the GPU's name, or the CPU model and core count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"{model} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"


def clock(lm) -> float:
    """perf_counter after the device has finished its queued work (CUDA runs asynchronously)."""
    import torch

    if str(lm.device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(lm.device))
    return time.perf_counter()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    return rows[:limit] if limit else rows


def naive_classify(lm, prompts, labels_text):
    """The naive loop: the full prompt, batch 1, on the model's device. Single-token labels: one
    forward per item and the argmax over the label tokens; longer labels: one forward per item and
    label, summed log-probs. float() on a device tensor waits for it (one sync per score)."""
    import torch

    conts = [lm.continuation_ids(t) for t in labels_text]
    start = lm.model.config.decoder_start_token_id if lm.is_encoder_decoder else None

    def tensor(data):
        return torch.tensor(data, device=lm.device)

    def logprobs(ids, cont):
        with torch.inference_mode():
            if lm.is_encoder_decoder:
                logits = lm.model(input_ids=tensor([ids]), decoder_input_ids=tensor([[start] + cont[:-1]])).logits[0]
            else:
                logits = lm.model(input_ids=tensor([ids + cont[:-1]])).logits[0, -len(cont):]
        return torch.log_softmax(logits.float(), -1)

    preds = []
    for prompt in prompts:
        ids = lm.token_ids(prompt.text, prompt.chat)  # the whole prompt text, tokenized as a whole
        if all(len(c) == 1 for c in conts):
            last = logprobs(ids, conts[0])[-1]
            scores = [float(last[c[0]]) for c in conts]
        else:
            scores = [float(logprobs(ids, c).gather(-1, tensor(c)[:, None]).sum()) for c in conts]
        preds.append(max(range(len(conts)), key=scores.__getitem__))
    return preds


def case_classify(model: str, data: Path, template: str, shots: int, limit: int | None, batch_size: int | None,
                  device: str = "auto", dtype: str = "auto") -> dict:
    from llmlab.scoring import classify
    from llmlab.prompting import prompts
    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.io.records import Item
    from llmlab.orchestration.session import Session

    # The same session helper as `llmlab classify`: model, chat decision and prompt builder.
    session = Session(ModelConfig(model, device, dtype))
    lm = session.lm
    tmpl = prompts.find_template(template)
    builder = session.builder(tmpl, PromptConfig(template, shots=shots, selection="balanced", seed=0), 1, None)
    rows = load_jsonl(data, limit)
    items = [Item(i, r, f"row {i}") for i, r in enumerate(rows)]
    clf = classify.Classifier(lm, builder, batch_size=batch_size)
    started = clock(lm)
    fast = [clf.labels.index(r.prediction) for r in clf.classify(items)]
    fast_s = clock(lm) - started
    prompts_ = [builder.build(item, clf.label_tokens) for item in items]
    continuations = clf._continuations(prompts_[0])
    multi = [c for c in continuations if len(lm.continuation_ids(c)) > 1]
    started = clock(lm)
    slow = naive_classify(lm, prompts_, continuations)
    slow_s = clock(lm) - started
    gold = [clf.labels.index(str(r[tmpl.target])) for r in rows]
    return {
        "items": len(items), "llmlab_items_per_s": len(items) / fast_s, "naive_items_per_s": len(items) / slow_s,
        "speedup": slow_s / fast_s, "agreement": sum(a == b for a, b in zip(fast, slow)) / len(items),
        "accuracy_llmlab": sum(a == g for a, g in zip(fast, gold)) / len(items),
        "accuracy_naive": sum(a == g for a, g in zip(slow, gold)) / len(items),
        "multi_token_labels": multi, "chat": builder.options.chat, "peak_rss_mb": peak_rss_mb(),
        "device": device_name(lm.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
        "batch_size": batch_size or "auto",
    }


def generation_requests(model: str, prompts_text: list[str], device: str, dtype: str):
    from llmlab.backends import models
    from llmlab.scoring.generation import chat_text
    from llmlab.orchestration.session import chat_for

    lm = models.load(model, device, dtype)
    chat = chat_for(lm.tokenizer, None)
    texts = [chat_text(lm.tokenizer, [{"role": "user", "content": p}]) if chat else p for p in prompts_text]
    return lm, [models.GenRequest(t, chat) for t in texts]


def timed_generate(lm, requests, settings, batch_size, engine: str) -> tuple[list, float]:
    """(outputs, seconds) of one lm.generate call with --gen-engine ENGINE."""
    lm.gen_engine = engine
    started = clock(lm)
    out = lm.generate(requests, settings, batch_size=batch_size)
    return out, clock(lm) - started


def case_generate(model: str, prompts_text: list[str], max_new_tokens: int, batch_size: int | None,
                  device: str = "auto", dtype: str = "auto") -> dict:
    """llmlab's batched generate (--gen-engine auto) against generate() one prompt at a time."""
    from llmlab.core.settings import build

    lm, requests = generation_requests(model, prompts_text, device, dtype)
    settings = build({"max_new_tokens": max_new_tokens})
    fast, fast_s = timed_generate(lm, requests, settings, batch_size, "auto")
    started = clock(lm)
    lm.gen_engine = "padded"
    slow = [lm.generate([r], settings, batch_size=1)[0] for r in requests]
    slow_s = clock(lm) - started
    fast_tokens = sum(o.completion_tokens[0] for o in fast)
    slow_tokens = sum(o.completion_tokens[0] for o in slow)
    differ = [i for i, (a, b) in enumerate(zip(fast, slow)) if a.completions != b.completions]
    return {
        "items": len(requests), "llmlab_tokens_per_s": fast_tokens / fast_s, "naive_tokens_per_s": slow_tokens / slow_s,
        "speedup": (fast_tokens / fast_s) / (slow_tokens / slow_s),
        "agreement": 1 - len(differ) / len(requests), "differing_items": differ, "peak_rss_mb": peak_rss_mb(),
        "device": device_name(lm.device), "engine_auto": _auto_engine(lm, settings), "new_tokens": max_new_tokens,
    }


def _auto_engine(lm, settings) -> str:
    from llmlab.backends import hf_continuous

    lm.gen_engine = "auto"
    return hf_continuous.choose(lm, settings) if hasattr(lm, "model") else "n/a"


def case_engines(model: str, prompts_text: list[str], max_new_tokens: int, batch_size: int | None,
                 device: str = "auto", dtype: str = "auto") -> dict:
    """The two generate engines on the same prompts and batches: padded generate() against
    transformers' continuous batching (generate_batch). Both warm up on two short prompts first;
    then padded, continuous, padded again (the best padded time counts: the CPU is shared)."""
    from llmlab.core.settings import build

    lm, requests = generation_requests(model, prompts_text, device, dtype)
    settings = build({"max_new_tokens": max_new_tokens})
    for engine in ("padded", "continuous"):
        timed_generate(lm, requests[:2], build({"max_new_tokens": 2}), batch_size, engine)
    padded, padded_s = timed_generate(lm, requests, settings, batch_size, "padded")
    continuous, continuous_s = timed_generate(lm, requests, settings, batch_size, "continuous")
    _, again_s = timed_generate(lm, requests, settings, batch_size, "padded")
    tokens = sum(o.completion_tokens[0] for o in padded)
    differ = [i for i, (a, b) in enumerate(zip(continuous, padded)) if a.completions != b.completions]
    return {
        "items": len(requests), "padded_tokens_per_s": tokens / min(padded_s, again_s),
        "padded_runs_s": [padded_s, again_s], "continuous_runs_s": [continuous_s],
        "continuous_tokens_per_s": sum(o.completion_tokens[0] for o in continuous) / continuous_s,
        "agreement": 1 - len(differ) / len(requests), "differing_items": differ, "peak_rss_mb": peak_rss_mb(),
        "device": device_name(lm.device), "batch_size": batch_size or "auto", "engine_auto": _auto_engine(lm, settings),
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


def dialogsum_prompts(limit: int | None) -> list[str]:
    rows = load_jsonl(SHARED / "dialogsum" / "dialogsum.test.jsonl", min(limit or 64, 64))
    return [f"Summarize the following conversation.\n\n{r['dialogue']}\n\nSummary:" for r in rows]


def run_case(name: str, args: argparse.Namespace) -> dict:
    # On a CPU the measured batch sizes (32 rows classify, 16 generate); on a GPU --batch-size auto.
    gpu = args.device.startswith("cuda")
    where = {"device": args.device, "dtype": args.dtype}
    if name == "a":
        return case_classify(args.model, SHARED / "sst2" / "sst2.validation.jsonl", "sentiment", 4, args.limit,
                             None if gpu else 32, **where)
    if name == "b":
        return case_generate(args.model, dialogsum_prompts(args.limit), args.new_tokens, None if gpu else 16, **where)
    if name == "e":
        return case_engines(args.model, dialogsum_prompts(args.limit), args.new_tokens, None if gpu else 16, **where)
    if name == "c":
        with tempfile.TemporaryDirectory() as tmp:
            model = flan_t5_small(Path(tmp) / "flan-t5-small-random")
            result = {"classify": case_classify(model, SHARED / "sst2" / "sst2.validation.jsonl", "sentiment", 4,
                                                args.limit or 872, None if gpu else 32, **where)}
            rows = load_jsonl(SHARED / "dialogsum" / "dialogsum.test.jsonl", min(args.limit or 64, 64))
            prompts_text = [f"Summarize the following conversation.\n\n{r['dialogue']}" for r in rows]
            result["generate"] = case_generate(model, prompts_text, args.new_tokens, None if gpu else 16, **where)
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
        one_token = llmlab + ["generate", "Hi", "--max-new-tokens", "1", "-m", args.model, "--device", args.device]
        helps = [timed(llmlab + ["--help"], env) for _ in range(3)]
        cold = timed(one_token, env)
        warm = [timed(one_token, env) for _ in range(3)]
    return {"help_s": min(helps), "cold_gguf_run_s": cold, "cached_run_s": min(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="a,b,c,e,startup", help="comma-separated: a, b, c, e, startup")
    parser.add_argument("--limit", type=int, default=None, help="items per case (default: the full sizes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (as llmlab's --device)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (as llmlab's --dtype)")
    parser.add_argument("--model", default="smollm2", help="the model of cases a, b and e (e.g. a .gguf path)")
    parser.add_argument("--new-tokens", type=int, default=50, help="new tokens per prompt in b, c and e")
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
            cmd = [sys.executable, __file__, "--case-only", name, "--device", args.device, "--dtype", args.dtype,
                   "--model", args.model, "--new-tokens", str(args.new_tokens)]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # say why and go on: one failed case must not lose the others
                print(f"{name}: FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        if args.json:  # after every case, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(r: dict) -> str:
    lines = ["| case | llmlab | naive loop | ratio | agreement | peak RSS | target |", "|---|---|---|---|---|---|---|"]

    NEW = r.get("b", {}).get("new_tokens", 50)

    def row(label, c, unit, target):
        rate = "items_per_s" if unit == "items/s" else "tokens_per_s"
        lines.append(f"| {label} | {c['llmlab_' + rate]:.1f} {unit} | {c['naive_' + rate]:.1f} {unit} | "
                     f"{c['speedup']:.1f}x | {c['agreement'] * 100:.1f}% | {c['peak_rss_mb']:.0f} MB | {target} |")

    if "a" in r:
        row(f"(a) classify sentiment 4-shot, SST-2 ({r['a']['items']}), smollm2 {r['a']['dtype']}", r["a"], "items/s",
            ">= 5x, >= 99.5% agree, RSS < 1.5 GB")
    if "b" in r:
        row(f"(b) generate DialogSum ({r['b']['items']}), {NEW} new tokens, smollm2, engine {r['b']['engine_auto']}",
            r["b"], "tokens/s", ">= 3x")
    if "c" in r:
        row(f"(c) classify 4-shot, FLAN-T5-small shape ({r['c']['classify']['items']})", r["c"]["classify"], "items/s", "")
        row(f"(c) generate, FLAN-T5-small shape ({r['c']['generate']['items']})", r["c"]["generate"], "tokens/s", "")
    if "e" in r:
        e = r["e"]
        lines.append(f"| (e) generate engines, DialogSum ({e['items']}), smollm2: continuous vs padded | "
                     f"{e['continuous_tokens_per_s']:.1f} tokens/s | padded {e['padded_tokens_per_s']:.1f} tokens/s | "
                     f"{e['continuous_tokens_per_s'] / e['padded_tokens_per_s']:.2f}x | {e['agreement'] * 100:.1f}% | "
                     f"{e['peak_rss_mb']:.0f} MB | auto picks {e['engine_auto']} |")
    if "startup" in r:
        s = r["startup"]
        lines.append(f"| `llmlab --help` | {s['help_s']:.2f} s | | | | | < 0.5 s |")
        lines.append(f"| smollm2 load + 1 token, cached | {s['cached_run_s']:.2f} s | cold (GGUF) {s['cold_gguf_run_s']:.1f} s | | | | < 4 s |")
    devices = sorted({c["device"] for c in r.values() if isinstance(c, dict) and "device" in c})
    if devices:
        lines.append(f"\nDevice: {'; '.join(devices)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
