import json

import pytest

from helpers import TEST_DEVICE, invoke, jsonl, on_device
from llmlab.scoring import classify
from llmlab.orchestration import evaluate
from llmlab.backends import models
from llmlab.prompting import prompts
from llmlab.core.errors import ContextOverflowError
from llmlab.io.records import Item

TEMPLATE = """\
name: toy
task: classify
instruction: Label each review.
input: "Review: {text}\\nSentiment:"
target: label
labels:
  pos: positive
  neg: Negative words
examples:
  - {text: great fun, label: pos}
  - {text: so dull, label: neg}
  - {text: loved it, label: pos}
  - {text: awful mess, label: neg}
generation: {max_new_tokens: 3}
"""
ITEMS = [{"id": f"i{n}", "text": t, "label": l} for n, (t, l) in enumerate(
    [("the movie was great", "pos"), ("the film was terrible and boring", "neg"), ("meh", "neg"),
     ("Where is Ganymede?", "pos"), ("a charming story", "pos")])]


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TEMPLATE)
    return prompts.load_template(str(path))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {k: models.load(str(tiny_models[k]), TEST_DEVICE) for k in ("llama", "t5", "gpt2")}


def by_hand(lm, context_ids, cont_ids):
    """log P(cont | context) straight from model(...) logits, one sequence at a time."""
    import torch

    with torch.no_grad():
        if lm.is_encoder_decoder:
            start = lm.model.config.decoder_start_token_id
            logits = lm.model(input_ids=on_device(lm, [context_ids]),
                              decoder_input_ids=on_device(lm, [[start] + cont_ids[:-1]])).logits[0]
            positions = range(len(cont_ids))
        else:
            logits = lm.model(on_device(lm, [context_ids + cont_ids])).logits[0]
            positions = range(len(context_ids) - 1, len(context_ids) + len(cont_ids) - 1)
    logprobs = torch.log_softmax(logits.float(), -1)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, cont_ids))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("shots", [0, 2])
def test_label_scores_equal_a_hand_computation(lms, toy, kind, shots):
    lm = lms[kind]
    builder = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, prompts.BuildOptions(shots=shots, selection="first"),
                                    encoder_decoder=lm.is_encoder_decoder)
    clf = classify.Classifier(lm, builder, batch_size=3)
    items = [Item(i, r, f"row {i}") for i, r in enumerate(ITEMS)]
    results = clf.classify(items)
    for item, result in zip(items, results):
        prompt = builder.build(item)
        context = lm.context_ids([prompt.text])
        scores = {}
        for label, verbalizer in toy.labels.items():
            cont = lm.continuation_ids(" " + verbalizer)
            assert (len(cont) == 1) == (label == "pos")  # single- and multi-token labels
            scores[label] = by_hand(lm, context, cont)
            assert result.logprobs[label] == pytest.approx(scores[label], abs=1e-4)
        expected = classify.softmax(list(scores.values()))
        assert list(result.probabilities.values()) == pytest.approx(expected, abs=1e-5)
        assert result.prediction == max(scores, key=scores.get)


@pytest.mark.parametrize("prefix, texts", [
    # the item starts right after "\n\n": the natural tokens at the seam differ from the prefix's own
    ("Label each review.\n\nReview: great fun\nSentiment: Positive\n\n",
     ("Review: a", "Review: the movie was great", "Review: so dull")),
    # a prefix ending inside a word: " mo" + "vie" is one token " movie" in the full text, so
    # the prefix's last token " mo" must not come from the cache
    ("Label each review.\n\nReview: great fun\nSentiment: Positive\n\nReview: the mo",
     ("vie", "vie was great", "od")),
])
def test_prefix_cache_scores_the_natural_tokenization(lms, prefix, texts):
    lm = lms["llama"]
    requests = [models.LLRequest(prefix + f"{t}\nSentiment:", c, prefix=prefix)
                for t in texts for c in (" positive", " Negative words")]
    cached_lengths = []
    original = lm.prefix_kv
    lm.prefix_kv = lambda ids: cached_lengths.append(len(ids)) or original(ids)
    try:
        cached = lm.loglikelihood(requests, batch_size=4)
    finally:
        del lm.prefix_kv
    assert len(cached_lengths) == 1 and cached_lengths[0] >= 8  # the shared prefix ran once
    for request, out in zip(requests, cached):
        context = lm.token_ids(request.context)  # the whole prompt text, tokenized as a whole
        whole = lm.token_ids(request.context + request.continuation)
        assert whole[: len(context)] == context
        assert out.logprob == pytest.approx(by_hand(lm, context, whole[len(context):]), abs=1e-4)
        assert out.tokens == len(whole) - len(context)


def test_scored_ids_are_the_whole_texts_tokenization(lms):
    """lm-eval's split: trailing whitespace of the context moves onto the continuation."""
    lm = lms["llama"]
    rows = lm.encode_pairs([models.LLRequest("Review: the movie was great\nSentiment: ", "positive"),
                            models.LLRequest("Review: the film", " was terrible")])
    for (ctx, cont), (head, tail) in zip(rows, [("Review: the movie was great\nSentiment:", " positive"),
                                                ("Review: the film", " was terrible")]):
        assert ctx + cont == lm.token_ids(head + tail)
        assert ctx == lm.token_ids(head)


def test_a_row_over_the_window_is_refused_not_cut(lms):
    lm = lms["gpt2"]  # a 64-token window
    with pytest.raises(ContextOverflowError, match="over the model's 64-token window"):
        lm.loglikelihood([models.LLRequest("the movie was great " * 20, " positive")])


def test_calibration_on_a_fixed_distribution():
    # p = (0.7, 0.3) under a prompt biased to the first label by p_cf = (0.8, 0.2):
    # p / p_cf = (0.875, 1.5) -> normalized (0.368, 0.632): the prediction flips.
    calibrated = classify.calibrate([0.7, 0.3], [0.8, 0.2])
    assert calibrated == pytest.approx([0.875 / 2.375, 1.5 / 2.375])


def test_calibration_uses_content_free_inputs(lms, toy):
    lm = lms["llama"]
    builder = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, prompts.BuildOptions(shots=2, selection="first"))
    clf = classify.Classifier(lm, builder, calibrate=True)
    result = clf.classify([Item(0, ITEMS[0], "row 0")])[0]
    # p_cf by hand: each content-free input under the same two shots, each label scored straight
    # from the model's logits, softmax over labels, mean over the inputs.
    per_input = []
    for text in classify.CONTENT_FREE:
        prompt = builder.build(Item(-1, {"text": text}, "cf"), shots=[0, 1])
        context = lm.token_ids(prompt.text)
        scores = [by_hand(lm, context, lm.continuation_ids(" " + v)) for v in toy.labels.values()]
        per_input.append(classify.softmax(scores))
    p_cf = [sum(p[k] for p in per_input) / len(per_input) for k in range(2)]
    assert clf.bias([0, 1]) == pytest.approx(p_cf, rel=1e-4, abs=1e-30)  # tiny label probabilities too
    raw = list(result.raw_probabilities.values())
    assert list(result.probabilities.values()) == pytest.approx(classify.calibrate(raw, p_cf), abs=1e-5)


@pytest.mark.parametrize(
    "text, label",
    [("Positive!", "pos"), ("I think it is negative words, not positive", "neg"),
     ("POSITIVE or negative words", "pos"), ("no idea", "unknown"), ("positively", "unknown"), ("neg", "neg")],
)
def test_label_from_generated_text(text, label):
    assert classify.label_from_text(text, {"pos": "Positive", "neg": "Negative words"}) == label


def test_classification_metrics_known_case():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    m = evaluate.classification_metrics(golds, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_label"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert m["per_label"]["b"]["precision"] == 0.5 and m["per_label"]["b"]["recall"] == 0.5
    assert m["per_label"]["c"]["precision"] == 0.5 and m["per_label"]["c"]["recall"] == 1.0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    with_unknown = evaluate.classification_metrics(["a", "b"], ["unknown", "b"], ["a", "b"])
    assert with_unknown["confusion"]["predicted"] == ["a", "b", "unknown"]
    assert with_unknown["confusion"]["matrix"] == [[0, 0, 1], [0, 1, 0]]


def test_generation_metrics_against_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "Paris."]
    refs = [["a cat was sitting on the mat", "the cat is on the mat"], ["paris"]]
    m = evaluate.generation_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = (max(scorer.score(r, preds[0])[key].fmeasure for r in refs[0]) + scorer.score("paris", "Paris.")[key].fmeasure) / 2
        assert m[key] == pytest.approx(expected)
    assert m["exact_match"] == 0.5


def test_classify_cli_jsonl(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--shots", 2])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert [r["id"] for r in rows] == [r["id"] for r in ITEMS]
    for row in rows:
        assert row["prediction"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["correct"] == (row["prediction"] == row["label"]) and row["shots"] == 2


def test_classify_cli_generate_method(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--method", "generate"])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert [r["id"] for r in rows] == [r["id"] for r in ITEMS]
    for row in rows:  # the label is read from the model's own completion
        assert row["prediction"] == classify.label_from_text(row["completion"], {"pos": "positive", "neg": "Negative words"})
        assert row["probabilities"] == {k: float(k == row["prediction"]) for k in ("pos", "neg")}


def test_classify_generate_method_reads_labels_from_completions(monkeypatch, data, tmp_path):
    from llmlab.backends.fake import FakeLM

    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE.replace("max_new_tokens: 3", "max_new_tokens: 30"))
    fake = FakeLM(answers=[" Positive!", " negative words", " no idea", " positive", " NEGATIVE WORDS and more"])
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: fake)
    result = invoke(["classify", "-t", tmpl, "-i", data, "--method", "generate"])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert [r["prediction"] for r in rows] == ["pos", "neg", "unknown", "pos", "neg"]
    assert [r["completion"] for r in rows] == [" Positive!", " negative words", " no idea", " positive",
                                               " NEGATIVE WORDS and more"]
    assert [r["correct"] for r in rows] == [True, True, False, True, False]
    assert [r.prompt for r in fake.requests] == [f"Label each review.\n\nReview: {r['text']}\nSentiment:" for r in ITEMS]


def test_classify_cli_calibrate(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    cal = invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--calibrate", "-v"])
    assert cal.exit_code == 0, cal.stderr
    assert "calibration bias p_cf (shots []): pos " in cal.stderr
    rows = jsonl(cal.stdout)
    assert len(rows) == len(ITEMS) and all(set(r["raw_probabilities"]) == {"pos", "neg"} for r in rows)


def test_classify_needs_a_classify_template(no_model):
    result = invoke(["classify", "-m", "./never-loaded", "-t", "qa", "x"])
    assert result.exit_code == 2 and "is a generate template" in result.stderr
