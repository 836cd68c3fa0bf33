"""The session's ScoreCache: bounded by bytes (hidden states counted), least recently used dropped first,
and shared by a session's classifiers so a prompt is scored once."""

import numpy as np

from llmlab.backends.fake import FakeLM
from llmlab.scoring.scorecache import ScoreCache, entry_bytes


def entry(width=0):
    return ([0.5, 0.5], [-0.7, -0.7], np.zeros(width, dtype=np.float32) if width else None)


def test_bounded_by_bytes_least_recently_used_first():
    one = entry_bytes(("a", False), entry(256))
    assert one == 8 * 4 + 256 * 4 + 1 + 64  # floats, the states' buffer, the key's text, overhead
    cache = ScoreCache(max_bytes=2 * one)
    cache.put(("a", False), entry(256))
    cache.put(("b", False), entry(256))
    assert cache.get(("a", False)) is not None  # a is now the most recently used
    cache.put(("c", False), entry(256))
    assert (cache.get(("b", False)), len(cache), cache.bytes) == (None, 2, 2 * one)
    assert cache.get(("a", False)) is not None and cache.get(("c", False)) is not None


def test_an_entry_over_the_whole_budget_is_not_kept():
    cache = ScoreCache(max_bytes=100)
    cache.put(("big", False), entry(1000))
    assert (len(cache), cache.bytes) == (0, 0)


def test_classifiers_sharing_a_cache_score_each_prompt_once(tmp_path):
    from llmlab.prompting import prompts
    from llmlab.io.items import Item
    from llmlab.scoring import classify

    path = tmp_path / "t.yaml"
    path.write_text("name: t\ntask: classify\ninput: '{text} ->'\ntarget: label\nlabels: [yes, no]\n")
    template = prompts.load_template(str(path))
    lm = FakeLM()
    builder = prompts.make_builder(template, lm.tokenizer, lm.window, prompts.options_for(template))
    items = [Item(0, {"text": "a"}, "x"), Item(1, {"text": "b"}, "x")]
    shared = ScoreCache()
    first = classify.Classifier(lm, builder, calibrate="contextual", cache=shared).classify(items)
    asked = len(lm.requests)
    again = classify.Classifier(lm, builder, calibrate="off", cache=shared).classify(items)
    assert len(lm.requests) == asked  # the second classifier scored nothing anew
    assert [r.raw_probabilities or r.probabilities for r in first] == [r.probabilities for r in again]
    classify.Classifier(lm, builder, calibrate="off").classify(items)  # its own cache: scored again
    assert len(lm.requests) == asked + 2 * len(items)
