"""A/A check of llmlab's paired statistics: how often two prompts that are equally good by
construction are called different. Each trial classifies the same rows with one template under two
demonstration draws, on FakeLM (its label scores are a hash of prompt and label, so every draw is
right on each row with probability 1/2 independently: equal accuracy in expectation, the null
hypothesis exactly), through the ordinary Session -> PromptBuilder -> Classifier path; then
llmlab.scoring.stats compares them. At the 5% level each rate should be near (McNemar's exact test:
at most) 5%.

    python bench/aa_check.py                       # 1000 trials of 200 rows (about a minute)
    python bench/aa_check.py --trials 200 --rows 100
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEMPLATE = """name: aa
task: classify
instruction: Is the review positive or negative?
input: "Review: {text}\\nSentiment:"
target: label
labels: {positive: Positive, negative: Negative}
"""


def rate(hits: int, n: int) -> str:
    """The rate with its 95% Wilson interval."""
    p, z = hits / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.1%} [{centre - half:.1%}, {centre + half:.1%}]"


def main() -> None:
    import random
    import tempfile

    from llmlab.backends.fake import FakeLM
    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.io.records import Item
    from llmlab.orchestration.session import Session
    from llmlab.prompting.templates import load_template
    from llmlab.scoring import classify, stats

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    words = "good bad fine dull sharp slow warm cold bright flat".split()
    pool = [{"text": f"{random.Random(n).choice(words)} example {n}", "label": "positive" if n % 2 else "negative"}
            for n in range(64)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "aa.yaml"
        path.write_text(TEMPLATE)
        template = load_template(str(path))
    template.examples = pool
    session = Session(ModelConfig(), FakeLM())
    ci_hits = exact_hits = mid_hits = 0
    started = time.perf_counter()
    for t in range(args.trials):
        rng = random.Random(10_000 + t)
        items = [Item(i, {"text": f"review {t}-{i} {rng.choice(words)}", "label": rng.choice(["positive", "negative"])},
                      "aa") for i in range(args.rows)]
        right = []
        for seed in (2 * t, 2 * t + 1):  # two demonstration draws of the same template
            builder = session.builder(template, PromptConfig(shots=args.shots, seed=seed), 3, None)
            results = classify.Classifier(session.lm, builder, batch_size=64).classify(items)
            right.append([float(r.prediction == r.item.fields["label"]) for r in results])
        d = stats.compare(right[0], right[1], seed=t, resamples=args.resamples)
        _, _, exact, mid = stats.mcnemar(right[0], right[1])
        ci_hits += d.significant
        exact_hits += exact < 0.05
        mid_hits += mid < 0.05
    n = args.trials
    print(f"A/A: {n} trials, {args.rows} rows each, {args.shots}-shot, two demonstration draws per trial "
          f"({time.perf_counter() - started:.0f}s)")
    print(f"95% paired bootstrap CI excludes 0: {rate(ci_hits, n)}")
    print(f"McNemar exact p < 0.05:             {rate(exact_hits, n)}")
    print(f"McNemar mid-p < 0.05:               {rate(mid_hits, n)}")


if __name__ == "__main__":
    main()
