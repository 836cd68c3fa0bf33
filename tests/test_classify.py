import json
import math

import pytest

from helpers import invoke, jsonl
from llmlab import classify, evaluate, models, prompts
from llmlab.io import Item

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
    return {k: models.load(str(tiny_models[k])) for k in ("llama", "t5", "gpt2")}


def by_hand(lm, context_ids, cont_ids):
    """log P(cont | context) straight from model(...) logits, one sequence at a time."""
    import torch

    with torch.no_grad():
        if lm.is_encoder_decoder:
            start = lm.model.config.decoder_start_token_id
            logits = lm.model(input_ids=torch.tensor([context_ids]),
                              decoder_input_ids=torch.tensor([[start] + cont_ids[:-1]])).logits[0]
            positions = range(len(cont_ids))
        else:
            logits = lm.model(torch.tensor([context_ids + cont_ids])).logits[0]
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


def test_prefix_cache_matches_the_plain_computation(lms):
    lm = lms["llama"]
    prefix = "Label each review.\n\nReview: great fun\nSentiment: Positive\n\n"
    requests = [models.LLRequest([prefix, f"Review: {t}\nSentiment:"], c)
                for t in ("a", "the movie was great", "so dull") for c in (" positive", " Negative words")]
    calls = []
    original = lm._prefix_cache
    lm._prefix_cache = lambda ids: calls.append(len(ids)) or original(ids)
    try:
        cached = lm.loglikelihood(requests, batch_size=4)
    finally:
        lm._prefix_cache = original
    plain = lm.loglikelihood(requests, batch_size=4, prefix_cache=False)
    assert len(calls) == 1  # the shared prefix was encoded once
    assert [c.logprob for c in cached] == pytest.approx([p.logprob for p in plain], abs=1e-4)


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
    plain = classify.Classifier(lm, builder)._score([builder.build(Item(-1, {"text": t}, "cf"), shots=[0, 1])
                                                     for t in classify.CONTENT_FREE])
    p_cf = [sum(p[0][k] for p in plain) / 3 for k in range(2)]
    raw = list(result.raw_probabilities.values())
    assert list(result.probabilities.values()) == pytest.approx(classify.calibrate(raw, p_cf), abs=1e-6)


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
        assert row["prediction"] in ("pos", "neg") and set(row["probabilities"]) == {"pos", "neg"}
        assert math.isclose(sum(row["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert row["correct"] == (row["prediction"] == row["label"]) and row["shots"] == 2


def test_classify_cli_generate_method_and_calibrate(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    gen = jsonl(invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--method", "generate"]).stdout)
    assert all("completion" in r and r["prediction"] in ("pos", "neg", "unknown") for r in gen)
    cal = invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "--calibrate", "-v"])
    assert "calibration bias p_cf (shots []): pos " in cal.stderr
    assert all("raw_probabilities" in r for r in jsonl(cal.stdout))


def test_eval_table_and_report(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    report = tmp_path / "report.json"
    result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--shots", "0,2", "--seeds", 2,
                     "--calibration", "both", "--report", report, "--log-samples"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:8] == ["template", "shots", "calibrated", "seeds", "n", "accuracy", "%", "macro-F1"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["toy", "0", "off", "1", "5"], ["toy", "0", "contextual", "1", "5"], ["toy", "2", "off", "2", "5"], ["toy", "2", "contextual", "2", "5"]]
    doc = json.loads(report.read_text())
    assert set(doc) >= {"model", "data", "config", "templates", "results", "versions", "created"}
    assert doc["templates"]["toy"]["text"] == TEMPLATE and doc["versions"]["transformers"]
    first = doc["results"][2]
    assert (first["shots"], first["calibrate"], first["seeds"]) == (2, "off", [0, 1])
    assert set(first["summary"]) == {"accuracy", "macro_f1", "items_per_s"}
    run = first["runs"][0]
    assert set(run["metrics"]) == {"accuracy", "macro_f1", "per_label", "confusion"}
    assert len(run["samples"]) == 5 and run["samples"][0]["id"] == "i0"
    accuracy = sum(s["correct"] for s in run["samples"]) / 5
    assert run["metrics"]["accuracy"] == pytest.approx(accuracy)


def test_eval_generate_template(tiny_models, tmp_path):
    tmpl = tmp_path / "sum.yaml"
    tmpl.write_text("name: sum\ntask: generate\ninput: 'Dialogue: {dialogue}\\nSummary:'\ntarget: summary\n"
                    "references: [summary1, summary2]\ngeneration: {max_new_tokens: 4}\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "dialogue": "hi", "summary1": "they greet", "summary2": "a greeting"}\n'
                    '{"id": "b", "dialogue": "bye", "summary1": "they part", "summary2": "farewell"}\n')
    result = invoke(["eval", "-m", tiny_models["t5"], "-t", tmpl, "--data", data])
    assert result.exit_code == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["template", "shots", "calibrated", "seeds", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L", "exact", "%", "items/s"]
    assert row.split()[:5] == ["sum", "0", "off", "1", "2"]


@pytest.mark.parametrize(
    "rows, error",
    [
        ("", "holds no inputs"),
        ('{"text": "a"}\n', "line 1: no label field 'label' (fields: text)"),
        ('{"label": "pos"}\n', "line 1: no field 'text' for template 'toy' (fields: label)"),
        ('{"text": "a", "label": "meh"}\n', "line 1: label 'meh' is not one of template 'toy''s labels: pos, neg"),
        ('{"id": 1, "text": "a", "label": "pos"}\n{"id": 1, "text": "b", "label": "neg"}\n', "line 2: duplicate id 1"),
    ],
)
def test_eval_bad_data(tiny_models, tmp_path, rows, error):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    data = tmp_path / "bad.jsonl"
    data.write_text(rows)
    report = tmp_path / "r.json"
    result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--report", report])
    assert result.exit_code == 3
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and not report.exists()


def test_eval_non_utf8(tiny_models, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "caf\xe9", "label": "pos"}\n')
    result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data])
    assert result.exit_code == 3 and "line 1: not UTF-8 text" in result.stderr


def test_classify_needs_a_classify_template(tiny_models):
    result = invoke(["classify", "-m", tiny_models["llama"], "-t", "qa", "x"])
    assert result.exit_code == 2 and "is a generate template" in result.stderr


def test_eval_report_folder_is_checked_before_the_run(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["eval", "-m", "./not-loaded", "-t", tmpl, "--data", data, "--report", tmp_path / "no" / "r.json"])
    assert result.exit_code == 3  # a data error, raised before the (bad) model is even looked at
    assert result.stderr == f"error: report folder '{tmp_path / 'no'}' does not exist\n"
