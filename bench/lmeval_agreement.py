"""Do llmlab and lm-evaluation-harness pick the same labels on the same prompts?

llmlab classifies SST-2 validation items with a template (4 balanced shots by default); the very
same prompt texts and label continuations are then scored by lm-evaluation-harness's own HFLM
(`loglikelihood`: its `_encode_pair` tokenization and its batching), on the same weights in the
same process, and the argmax labels are compared. Not a test: it needs lm-eval
(pip install 'llmlab[bench]') and the embedded model.

    python bench/lmeval_agreement.py --limit 200            # smollm2, sentiment, 4 shots, float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLMLAB_SHARED", ROOT.parent / "shared")) / "data"


def llmlab_side(args: argparse.Namespace):
    from llmlab.scoring import classify
    from llmlab.backends import models
    from llmlab.prompting import prompts
    from llmlab.scoring.generation import use_chat
    from llmlab.io.records import Item

    lm = models.load(args.model, "cpu", args.dtype)
    tmpl = prompts.find_template(args.template)
    chat = use_chat(lm.tokenizer, tmpl.chat or "auto")
    options = prompts.options_for(tmpl, shots=args.shots, chat=chat, max_new_tokens=1)
    builder = prompts.make_builder(tmpl, lm.tokenizer, lm.window, options, encoder_decoder=lm.is_encoder_decoder)
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()][: args.limit]
    items = [Item(i, r, f"row {i}") for i, r in enumerate(rows)]
    clf = classify.Classifier(lm, builder, batch_size=args.batch_size)
    started = time.perf_counter()
    results = clf.classify(items)
    seconds = time.perf_counter() - started
    built = [builder.build(item, clf.label_tokens) for item in items]
    gold = [str(r[tmpl.target]) for r in rows]
    logprobs = [lp for r in results for lp in r.logprobs.values()]
    return lm, clf, built, [r.prediction for r in results], gold, seconds, chat, logprobs


def lmeval_side(lm, clf, built, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, device="cpu")
    return run_harness(harness, clf, built)


def run_harness(harness, clf, built):
    """An lm-eval model's loglikelihood over every prompt x label continuation (the requests llmlab
    scores); (picks: the best label per prompt, seconds, scores)."""
    from lm_eval.api.instance import Instance

    requests, k = [], len(clf.labels)
    for n, prompt in enumerate(built):
        for j, continuation in enumerate(clf._continuations(prompt)):
            requests.append(Instance("loglikelihood", doc={}, arguments=(prompt.text, continuation), idx=n * k + j))
    started = time.perf_counter()
    scores = [logprob for logprob, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    seconds = time.perf_counter() - started
    picks = [clf.labels[max(range(k), key=scores[n * k : (n + 1) * k].__getitem__)] for n in range(len(built))]
    return picks, seconds, scores


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The options both lm-eval benches take: model, template, data, shots, limit, dtype, batch size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--template", default="sentiment")
    parser.add_argument("--data", default=str(SHARED / "sst2" / "sst2.validation.jsonl"))
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser


def main() -> None:
    args = arguments(__doc__).parse_args()
    lm, clf, built, ours, gold, our_s, chat, our_lp = llmlab_side(args)
    theirs, their_s, their_lp = lmeval_side(lm, clf, built, args.batch_size)
    import lm_eval

    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    result = {
        "items": len(ours), "model": args.model, "template": args.template, "shots": args.shots,
        "dtype": args.dtype, "chat": chat, "lm_eval": lm_eval.__version__,
        "agreement": 1 - len(differ) / len(ours), "differing_items": differ,
        "accuracy_llmlab": sum(a == g for a, g in zip(ours, gold)) / len(ours),
        "accuracy_lm_eval": sum(a == g for a, g in zip(theirs, gold)) / len(ours),
        "max_abs_logprob_diff": max(abs(a - b) for a, b in zip(our_lp, their_lp)),
        "llmlab_s": round(our_s, 2), "lm_eval_s": round(their_s, 2),
    }
    print(json.dumps(result))
    print(f"agreement {result['agreement'] * 100:.1f}% on {len(ours)} items "
          f"(accuracy llmlab {result['accuracy_llmlab'] * 100:.1f}%, lm-eval {result['accuracy_lm_eval'] * 100:.1f}%)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
