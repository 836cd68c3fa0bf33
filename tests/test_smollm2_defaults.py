"""A newcomer's first classify: the real embedded smollm2, `-t sentiment` and no other flag, must get
obvious reviews right. The reviews are written for this test (none comes from a dataset)."""

import json

import pytest

from helpers import invoke, jsonl

POSITIVE = [
    "I loved this film from start to finish. A joy.",
    "Wonderful acting and a beautiful story. Highly recommended!",
    "One of the best movies I have seen in years.",
    "A delightful, funny and moving film. I would watch it again tomorrow.",
    "Brilliant. The cast is superb and the script is sharp.",
    "An absolute triumph, gorgeous to look at and full of heart.",
    "Great fun for the whole family; we laughed all the way through.",
    "A masterpiece. Every scene is perfect.",
    "I was smiling the entire time. What a lovely movie.",
    "Excellent direction, a terrific score and a wonderful ending.",
    "Charming, warm and clever. I adored it.",
    "Fantastic! The best film of the year.",
]
NEGATIVE = [
    "Terrible. I walked out after twenty minutes.",
    "A boring, pointless mess. Avoid it.",
    "The worst movie I have ever seen.",
    "Awful acting and a plot that makes no sense.",
    "Dull, slow and far too long. I nearly fell asleep.",
    "A complete waste of time and money.",
    "I hated every minute of this film.",
    "Painfully bad dialogue and lazy, ugly direction.",
    "A dreadful film. Nothing works, not even the jokes.",
    "Stupid, loud and boring. Two hours I will never get back.",
    "Disappointing in every way; the ending is a disaster.",
    "Unwatchable. The script is a joke and the cast looks bored.",
]


# Measured (prompts/README.md, "Measured defaults"): with the defaults before the probe (4 balanced
# shots, contextual) smollm2 got 23 of these 24 ("A boring, pointless mess. Avoid it." -> positive);
# with the template's probe (fitted on its 120 written reviews) it gets all 24. sentiment-opt (the
# optimize winner: its probe shipped fitted, for smollm2) must too.
@pytest.mark.parametrize("template", ["sentiment", "sentiment-opt"])
def test_obvious_reviews_right_with_no_flags(smollm2_cache, monkeypatch, tmp_path, template):
    monkeypatch.setenv("LLMLAB_CACHE", str(smollm2_cache))
    data = tmp_path / "reviews.jsonl"
    reviews = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    data.write_text("".join(json.dumps({"id": f"r{n}", "text": t, "label": label}) + "\n"
                            for n, (t, label) in enumerate(reviews)))
    result = invoke(["classify", "-t", template, "-i", data])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    wrong = [(r["text"], r["prediction"]) for r in rows if r["prediction"] != r["label"]]
    assert len(rows) == 24 and wrong == []
