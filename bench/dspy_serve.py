"""A DSPy program against `llmlab serve`: dspy.Predict labels SST-2 sentences through DSPy's own
OpenAI-compatible client (LiteLLM), pointed at the server's /v1. DSPy only talks HTTP, so it can live
in a venv of its own without torch (its dependencies are not llmlab's):

    python -m venv /tmp/dspy && /tmp/dspy/bin/pip install dspy
    /tmp/dspy/bin/python bench/dspy_serve.py --llmlab-python .venv/bin/python --limit 8

Without --url it starts `llmlab serve` (with --llmlab-python, the interpreter llmlab is installed in)
on a free port and stops it at the end. Prints one JSON line: how many answers DSPy could parse,
accuracy, seconds. The answer is read leniently (the first label word in the reply) unless
--strict: the embedded 135M model seldom writes DSPy's own answer format. Not a test: it needs dspy and the embedded model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "sst2.validation.jsonl"


def start_server(python: str, model: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([python, "-m", "llmlab", "serve", "-m", model, "--port", "0"], stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # type: ignore[union-attr]
        if " at http" in line:
            return proc, line.split(" at ")[1].split("/v1")[0]
    raise SystemExit(f"llmlab serve did not start (exit {proc.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running llmlab serve (else one is started)")
    parser.add_argument("--llmlab-python", default=sys.executable)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=str(SST2))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--strict", action="store_true", help="DSPy's stock ChatAdapter (its answer format only)")
    args = parser.parse_args()
    import dspy

    rows = [json.loads(line) for line in open(args.data)][: args.limit]
    proc, url = (None, args.url) if args.url else start_server(args.llmlab_python, args.model)
    try:
        name = json.load(__import__("urllib.request").request.urlopen(url + "/v1/models"))["data"][0]["id"]
        lm = dspy.LM(f"openai/{name}", api_base=url + "/v1", api_key="none", temperature=0.0, max_tokens=40,
                     cache=False)
        labels = ("positive", "negative")

        class FirstLabel(dspy.ChatAdapter):
            """DSPy's chat prompt; the answer is the first label word the reply names. A 135M model
            rarely writes DSPy's `[[ ## sentiment ## ]]` answer format, which the stock adapters require."""

            def parse(self, signature, completion):  # noqa: ANN001, ANN201 - dspy's own signature
                text = completion.lower()
                found = sorted((text.find(label), label) for label in labels if label in text)
                if not found:
                    return super().parse(signature, completion)
                return {"sentiment": found[0][1]}

        dspy.configure(lm=lm, adapter=None if args.strict else FirstLabel())

        class Sentiment(dspy.Signature):
            """Classify the sentiment of a movie review sentence."""

            sentence: str = dspy.InputField()
            sentiment: Literal["positive", "negative"] = dspy.OutputField()

        predict = dspy.Predict(Sentiment)
        started, answers = time.perf_counter(), []
        for row in rows:
            try:
                answers.append(predict(sentence=row["text"]).sentiment)
            except Exception as exc:  # noqa: BLE001 - a small model may break DSPy's answer format
                answers.append(f"unparsed: {type(exc).__name__}")
        seconds = time.perf_counter() - started
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    parsed = [a for a in answers if a in ("positive", "negative")]
    print(json.dumps({"dspy": dspy.__version__, "model": name, "adapter": "ChatAdapter" if args.strict else
                      "ChatAdapter + first label word", "items": len(rows), "parsed": len(parsed),
                      "accuracy": sum(a == r["label"] for a, r in zip(answers, rows)) / len(rows),
                      "answers": answers, "seconds": round(seconds, 1), "requests": len(lm.history)}))


if __name__ == "__main__":
    main()
