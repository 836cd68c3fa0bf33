"""Does lm-evaluation-harness get the same answers from `llmlab serve` as from its own `hf` model?

The same SST-2 prompts and label continuations as bench/lmeval_agreement.py (the sentiment template,
4 balanced shots) are scored twice by lm-eval: with `local-completions` (its OpenAI-API client:
token ids in, echo + logprobs, HTTP) against a `llmlab serve` process on the embedded smollm2, and
with `hf` (HFLM) on the same weights in this process. The argmax labels are compared. Not a test:
it needs lm-eval (pip install 'llmlab[bench,serve]') and the embedded model.

    python bench/lmeval_serve.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmeval_agreement import arguments, llmlab_side, lmeval_side, run_harness  # noqa: E402


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`llmlab serve` on a free loopback port; (process, base URL) once it listens."""
    command = [sys.executable, "-m", "llmlab", "serve", "-m", args.model, "--dtype", args.dtype, "--device", "cpu",
               "--port", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "LLMLAB_LOG": "0"})
    for line in proc.stderr:
        if " at http" in line:
            return proc, line.split(" at ")[1].split("/v1")[0]
    raise SystemExit(f"llmlab serve did not start (exit {proc.wait()})")


def served_side(lm, clf, built, url: str, batch_size: int):
    """lm-eval's local-completions on the same prompts; (picks, seconds, scores)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    folder = tempfile.mkdtemp(prefix="llmlab-tokenizer-")
    lm.tokenizer.save_pretrained(folder)  # lm-eval tokenizes the requests itself (tokenized_requests)
    name = json.load(__import__("urllib.request").request.urlopen(url + "/v1/models"))["data"][0]["id"]
    harness = LocalCompletionsAPI(base_url=url + "/v1/completions", model=name, tokenizer=folder,
                                  tokenizer_backend="huggingface", tokenized_requests=True, batch_size=batch_size,
                                  max_length=lm.window or 2048)
    return run_harness(harness, clf, built)


def main() -> None:
    args = arguments(__doc__).parse_args()
    proc, url = start_server(args)
    try:
        lm, clf, built, ours, gold, our_s, chat, _ = llmlab_side(args)
        served, served_s, served_lp = served_side(lm, clf, built, url, args.batch_size)
    finally:
        proc.terminate()
        proc.wait(60)
    hf, hf_s, hf_lp = lmeval_side(lm, clf, built, args.batch_size)
    import lm_eval

    differ = [i for i, (a, b) in enumerate(zip(served, hf)) if a != b]
    result = {
        "items": len(hf), "model": args.model, "template": args.template, "shots": args.shots, "dtype": args.dtype,
        "chat": chat, "lm_eval": lm_eval.__version__,
        "agreement_serve_vs_hf": 1 - len(differ) / len(hf), "differing_items": differ,
        "agreement_serve_vs_llmlab_classify": sum(a == b for a, b in zip(served, ours)) / len(hf),
        "accuracy_serve": sum(a == g for a, g in zip(served, gold)) / len(hf),
        "accuracy_hf": sum(a == g for a, g in zip(hf, gold)) / len(hf),
        "max_abs_logprob_diff": max(abs(a - b) for a, b in zip(served_lp, hf_lp)),
        "local_completions_s": round(served_s, 2), "hf_s": round(hf_s, 2), "llmlab_classify_s": round(our_s, 2),
    }
    print(json.dumps(result))
    print(f"local-completions vs hf: {result['agreement_serve_vs_hf'] * 100:.1f}% of {len(hf)} items agree "
          f"(accuracy {result['accuracy_serve'] * 100:.1f}% vs {result['accuracy_hf'] * 100:.1f}%)", file=sys.stderr)


if __name__ == "__main__":
    main()
