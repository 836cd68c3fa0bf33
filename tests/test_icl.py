"""In-context learning beyond the anchors: similar demonstrations, batch/domain calibration,
ensembles over draws. Each number is checked against a computation done here by hand, straight from
the tiny model's logits."""

import json
import math

import pytest

from helpers import TEST_DEVICE, invoke, jsonl, on_device
from llmlab.scoring import classify
from llmlab.backends import models
from llmlab.prompting import prompts
from llmlab.prompting import retrieval
from llmlab.io.records import Item
from test_classify import ITEMS, TEMPLATE, by_hand

POOL = [
    {"text": "great fun", "label": "pos"},
    {"text": "so dull", "label": "neg"},
    {"text": "loved it", "label": "pos"},
    {"text": "awful mess", "label": "neg"},
    {"text": "a great fun movie for all", "label": "pos"},
    {"text": "dull and boring and dull", "label": "neg"},
]


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TEMPLATE)
    return prompts.load_template(str(path))


@pytest.fixture(scope="module")
def llama(tiny_models):
    return models.load(str(tiny_models["llama"]), TEST_DEVICE)


def items():
    return [Item(i, r, f"row {i}") for i, r in enumerate(ITEMS)]


def hand_probs(lm, template, prompt):
    """Softmax over each label's summed log-probability after the prompt, from raw logits."""
    context = lm.context_ids([prompt.text])
    scores = [by_hand(lm, context, lm.continuation_ids(prompt.answer_prefix + v)) for v in template.labels.values()]
    return classify.softmax(scores)


def divide(p, b):
    q = [x / y for x, y in zip(p, b)]
    return [x / sum(q) for x in q]


def mean(rows):
    return [sum(col) / len(col) for col in zip(*rows)]


def builder_for(lm, template, **options):
    return prompts.PromptBuilder(template, lm.tokenizer, lm.window, prompts.BuildOptions(**options), lm=lm)


# ---------------------------------------------------------------- calibration


def test_batch_calibration_divides_by_the_mean_over_the_inputs(llama, toy):
    builder = builder_for(llama, toy, shots=2, selection="first")
    results = classify.Classifier(llama, builder, calibrate="batch").classify(items(), chunk=2)
    raw = [hand_probs(llama, toy, builder.build(item)) for item in items()]
    bias = mean(raw)  # Zhou et al.: the mean label probability over the evaluated inputs themselves
    for r, p in zip(results, raw):
        assert list(r.raw_probabilities.values()) == pytest.approx(p, abs=1e-5)
        assert list(r.probabilities.values()) == pytest.approx(divide(p, bias), abs=1e-5)
        assert r.prediction == max(zip(toy.labels, divide(p, bias)), key=lambda kv: kv[1])[0]
    # calibrated this way, the mean prediction is as close to uniform as the inputs allow
    assert mean([list(r.probabilities.values()) for r in results])[0] == pytest.approx(0.5, abs=0.05)


def test_domain_texts_are_random_in_domain_words():
    rows = [Item(0, {"text": "one two three four"}, "a"), Item(1, {"text": "five six"}, "b")]
    texts = classify.domain_texts(rows, ["text"], seed=3, n=20)
    words = {"one", "two", "three", "four", "five", "six"}
    assert len(texts) == 20 and all(len(t.split()) == 3 for t in texts)  # mean length: 6 words / 2 inputs
    assert all(set(t.split()) <= words for t in texts)
    assert texts == classify.domain_texts(rows, ["text"], seed=3, n=20) != classify.domain_texts(rows, ["text"], 4)


def test_domain_calibration_uses_random_in_domain_texts(llama, toy):
    builder = builder_for(llama, toy, shots=2, selection="first", seed=1)
    results = classify.Classifier(llama, builder, calibrate="domain").classify(items())
    texts = classify.domain_texts(items(), ["text"], seed=1)
    bias = mean([hand_probs(llama, toy, builder.build(Item(-1, {"text": t}, "cf"), shots=[0, 1])) for t in texts])
    for item, r in zip(items(), results):
        p = hand_probs(llama, toy, builder.build(item))
        assert list(r.probabilities.values()) == pytest.approx(divide(p, bias), abs=1e-5)


def test_contextual_calibration_by_name(llama, toy):
    builder = builder_for(llama, toy, shots=2, selection="first")
    r = classify.Classifier(llama, builder, calibrate="contextual").classify(items()[:1])[0]
    bias = mean([hand_probs(llama, toy, builder.build(Item(-1, {"text": t}, "cf"), shots=[0, 1]))
                 for t in classify.CONTENT_FREE])
    p = hand_probs(llama, toy, builder.build(items()[0]))
    assert list(r.probabilities.values()) == pytest.approx(divide(p, bias), abs=1e-5)


@pytest.mark.parametrize("value, mode", [(True, "contextual"), ("on", "contextual"), (False, "off"), (None, "off"),
                                         ("batch", "batch"), ("domain", "domain"),
                                         ("probe", "probe")])
def test_calibration_mode(value, mode):
    assert classify.calibration_mode(value) == mode


def test_unknown_calibration_is_a_usage_error():
    with pytest.raises(classify.UsageError, match="invalid --calibrate 'bogus': choose off, contextual, batch, domain"):
        classify.calibration_mode("bogus")


# ---------------------------------------------------------------- ensembles


def test_ensemble_averages_over_draws(llama, tmp_path):
    path = tmp_path / "close.yaml"  # one-token labels: probabilities far from 0 and 1, so draws differ
    path.write_text(TEMPLATE.replace("neg: Negative words", "neg: negative"))
    toy = prompts.load_template(str(path))
    builder = builder_for(llama, toy, shots=2, selection="balanced", seed=5)
    results = classify.Classifier(llama, builder, ensemble=3).classify(items())
    spread = 0.0
    for item, r in zip(items(), results):
        draws = []
        for d in range(3):  # draw d is the balanced draw of seed 5 + d
            shots = prompts.select_shots(toy, toy.examples, 2, "balanced", 5 + d, builder.exclusions(item))
            draws.append(hand_probs(llama, toy, builder.build(item, shots=shots)))
        assert list(r.probabilities.values()) == pytest.approx(mean(draws), abs=1e-6)
        spread = max(spread, max(abs(a[0] - b[0]) for a in draws for b in draws))
    assert spread > 4e-6  # the draws disagree beyond the tolerance, so averaging is what made them match
    assert len({tuple(builder.choose_shots(items()[0], d)) for d in range(3)}) > 1  # the draws differ


def test_ensemble_with_calibration_calibrates_each_draw(llama, toy):
    builder = builder_for(llama, toy, shots=2, selection="first")
    results = classify.Classifier(llama, builder, calibrate="batch", ensemble=2).classify(items())
    per_draw = [[hand_probs(llama, toy, builder.build(item, draw=d)) for item in items()] for d in range(2)]
    assert builder.choose_shots(items()[0], 1) == [1, 0]  # first: draw 1 is another order of the same two
    for n, r in enumerate(results):
        expected = mean([divide(per_draw[d][n], mean(per_draw[d])) for d in range(2)])
        assert list(r.probabilities.values()) == pytest.approx(expected, abs=1e-5)


def test_ensemble_reuses_each_draws_prefix(llama, toy):
    builder = builder_for(llama, toy, shots=2, selection="balanced")
    calls = []
    original = llama.prefix_kv
    llama.prefix_kv = lambda ids: calls.append(tuple(ids)) or original(ids)
    try:
        classify.Classifier(llama, builder, ensemble=3).classify(items())
    finally:
        llama.prefix_kv = original
    draws = {tuple(builder.choose_shots(items()[0], d)) for d in range(3)}
    assert len(calls) == len(set(calls)) == len(draws) > 1  # one shared prefix per distinct draw, encoded once


# ---------------------------------------------------------------- similar demonstrations


def test_tfidf_nearest_matches_a_hand_cosine(toy):
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [e["text"] for e in POOL]
    retriever = retrieval.make_retriever("tfidf", texts)
    query = ["great fun and dull"]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts)
    a, b = vec.transform(query).toarray()[0], vec.transform(texts).toarray()
    cosine = [float(a @ row) / (math.sqrt(a @ a) * math.sqrt(row @ row)) for row in b]
    assert retriever.similarities(query)[0] == pytest.approx(cosine, abs=1e-9)
    ranked = sorted(range(len(POOL)), key=lambda i: (-cosine[i], i))
    assert retrieval.nearest(retriever.similarities(query), 3, [set()]) == [ranked[:3][::-1]]
    assert retrieval.nearest(retriever.similarities(query), 2, [{ranked[0]}]) == [ranked[1:3][::-1]]


def test_index_is_cached_by_the_pools_content(monkeypatch):
    retrieval._MEMO.clear()
    texts = [e["text"] for e in POOL]
    first = retrieval.make_retriever("tfidf", texts)
    files = list(retrieval.cache_dir().glob("tfidf-*.npz"))
    assert [f.name for f in files] == [f"tfidf-{retrieval.pool_hash(texts)}.npz"]
    retrieval._MEMO.clear()
    monkeypatch.setattr(retrieval.TfidfRetriever, "_fit", lambda texts: pytest.fail("the cached index was refit"))
    again = retrieval.make_retriever("tfidf", texts)
    assert again.similarities(["so dull"]).tolist() == first.similarities(["so dull"]).tolist()
    assert retrieval.pool_hash(texts) != retrieval.pool_hash(texts[::-1])


def test_hidden_embedding_is_the_mean_last_hidden_state(llama):
    import torch

    retriever = retrieval.make_retriever("hidden", [e["text"] for e in POOL], llama)
    for text in ("so dull", "a great fun movie for all"):
        ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = llama.model(on_device(llama, [ids]), output_hidden_states=True).hidden_states[-1][0]
        expected = torch.nn.functional.normalize(last.mean(0), dim=0).cpu().numpy()
        assert retriever.embed([text, "x"])[0] == pytest.approx(expected, abs=1e-5)
    sims = retriever.similarities(["so dull"])
    assert int(sims[0].argmax()) == 1  # a pool row is nearest to itself


@pytest.mark.parametrize("selection", ["similar-tfidf", "similar-hidden"])
def test_similar_selection_in_the_builder(llama, toy, selection):
    builder = prompts.PromptBuilder(toy, llama.tokenizer, llama.window,
                                    prompts.BuildOptions(shots=2, selection=selection), POOL, lm=llama)
    item = Item(0, {"text": "dull and boring and dull"}, "row 0")
    shots = builder.build(item).shots
    assert 5 not in shots  # the pool row equal to the item is never its own demonstration
    sims = builder._retriever.similarities(["dull and boring and dull"])[0]
    ranked = [i for i in sorted(range(len(POOL)), key=lambda i: (-sims[i], i)) if i != 5]
    assert shots == ranked[:2][::-1]  # most similar last, right before the query
    other = builder.build(Item(1, {"text": "great fun movie"}, "row 1")).shots
    assert other != shots and 4 in other


def test_similar_hidden_needs_a_model(toy):
    from llmlab.core.errors import UsageError

    builder = prompts.PromptBuilder(toy, None, None, prompts.BuildOptions(shots=1, selection="similar-hidden"), POOL)
    with pytest.raises(UsageError, match="needs the model's hidden states"):
        builder.build(Item(0, {"text": "x"}, "row 0"))


# ---------------------------------------------------------------- the commands


def test_eval_compares_calibration_methods(tiny_models, tmp_path):
    tmpl, data = tmp_path / "toy.yaml", tmp_path / "data.jsonl"
    tmpl.write_text(TEMPLATE)
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--shots", "2",
                     "--calibration", "off,contextual,batch,domain", "--ensemble", "2", "--shot-selection", "similar"])
    assert result.exit_code == 0, result.stderr
    rows = [line.split()[:6] for line in result.stdout.splitlines()[2:6]]
    assert rows == [["toy", "data.jsonl", "2", m, "1", "5"] for m in ("off", "contextual", "batch", "domain")]


@pytest.mark.parametrize("args, message", [
    (["--calibration", "batch", "great"], "--calibration batch estimates the bias from the inputs themselves"),
    (["--calibration", "bogus", "great"], "invalid --calibration 'bogus'"),
    (["--ensemble", "0", "great"], "Invalid value for '--ensemble'"),
    (["--shot-selection", "nearest", "--shots", "1", "great"], "Invalid value for '--shot-selection': 'nearest'"),
])
def test_classify_usage_errors(no_model, tmp_path, args, message):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["classify", "-m", "./never-loaded", "-t", tmpl, *args])
    assert result.exit_code == 2 and message in result.stderr


def test_classify_similar_with_a_pool_file(tiny_models, tmp_path):
    tmpl, pool, data = tmp_path / "toy.yaml", tmp_path / "pool.jsonl", tmp_path / "data.jsonl"
    tmpl.write_text(TEMPLATE)
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    out = jsonl(invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--examples", pool,
                        "--shots", "3", "--shot-selection", "similar", "--calibration", "batch"]).stdout)
    assert [r["shots"] for r in out] == [3] * 5 and all("raw_probabilities" in r for r in out)
