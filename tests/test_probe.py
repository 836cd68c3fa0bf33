"""--calibration probe (in-context probing): the hidden states llmlab reads equal a plain forward
pass, the probe's probabilities equal a logistic regression fitted here by hand on those states, a
fitted probe is cached, and every mistake is one line before model time."""

import json

import pytest

from helpers import TEST_DEVICE, invoke, jsonl, on_device
from llmlab.scoring import classify
from llmlab.backends import models
from llmlab.scoring import probe
from llmlab.prompting import prompts
from llmlab.backends.fake import FakeLM
from llmlab.io.records import Item
from llmlab.backends.models import LLRequest
from test_classify import ITEMS, TEMPLATE

# Written for these tests: two labels, three words each way.
TRAIN = [{"text": t, "label": label} for t, label in [
    ("good fun", "pos"), ("a good film", "pos"), ("good, good, good", "pos"), ("really good", "pos"),
    ("good acting", "pos"), ("so good", "pos"), ("bad fun", "neg"), ("a bad film", "neg"),
    ("bad, bad, bad", "neg"), ("really bad", "neg"), ("bad acting", "neg"), ("so bad", "neg")]]


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {kind: models.load(str(tiny_models[kind]), TEST_DEVICE) for kind in ("llama", "gpt2", "t5")}


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TEMPLATE)
    return prompts.load_template(str(path))


def rows(data):
    return [Item(i, dict(r), f"row {i}") for i, r in enumerate(data)]


def states_by_hand(lm, text, layers):
    """The asked layers' states where the first label token is predicted, from one plain forward
    pass of the whole prompt (decoder-only: its last token; T5: the decoder's start position)."""
    import numpy as np
    import torch

    ids = lm.context_ids([text])
    with torch.no_grad():
        if lm.is_encoder_decoder:
            start = lm.model.config.decoder_start_token_id
            out = lm.model(input_ids=on_device(lm, [ids]), decoder_input_ids=on_device(lm, [[start]]),
                           output_hidden_states=True)
            hidden, at = out.decoder_hidden_states, 0
        else:
            hidden, at = lm.model(on_device(lm, [ids]), output_hidden_states=True).hidden_states, len(ids) - 1
    return np.concatenate([hidden[layer][0, at].float().cpu().numpy() for layer in layers])


# ---------------------------------------------------------------- the model boundary


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_hidden_states_equal_a_plain_forward(lms, kind):
    lm = lms[kind]
    prefix = "Label each review.\n\nReview: great fun\nSentiment: positive\n\n"
    texts = [prefix + f"Review: {t}\nSentiment:" for t in ("so dull", "a charming story that goes on", "meh")]
    requests = [LLRequest(t, c, prefix=prefix) for t in texts for c in (" positive", " Negative words")]
    layers = [0, 1, lm.num_layers]
    outputs = lm.loglikelihood(requests, batch_size=4, hidden_layers=layers)  # prefix cache, batched, padded
    for request, out in zip(requests, outputs):
        assert out.hidden.shape == (3 * lm.model.config.get_text_config().hidden_size,)
        assert out.hidden == pytest.approx(states_by_hand(lm, request.context, layers), abs=1e-4)
    assert all(o.hidden is None for o in lm.loglikelihood(requests[:2]))  # not asked: not read


# ---------------------------------------------------------------- the probe's numbers


def test_probe_probabilities_equal_a_logistic_regression_fitted_by_hand(lms, toy):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    lm = lms["llama"]
    builder = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, prompts.BuildOptions(shots=2, selection="first"), lm=lm)
    source = probe.Source(rows(TRAIN), "1,2")
    clf = classify.Classifier(lm, builder, calibrate="probe", probe=source)
    results = clf.classify(rows(ITEMS))
    fitted = clf.probe(0)
    train = np.array([states_by_hand(lm, builder.build(item).text, [1, 2]) for item in rows(TRAIN)])
    mean, scale = train.mean(0), train.std(0)
    gold = [["pos", "neg"].index(r["label"]) for r in TRAIN]
    by_hand = LogisticRegression(C=fitted.c, max_iter=5000).fit((train - mean) / scale, gold)
    assert fitted.c in probe.GRID and fitted.rows == 12 and fitted.labels == ["pos", "neg"]
    for item, result in zip(rows(ITEMS), results):
        state = states_by_hand(lm, builder.build(item).text, [1, 2])
        expected = by_hand.predict_proba(((state - mean) / scale)[None])[0]
        assert list(result.probabilities.values()) == pytest.approx(list(expected), abs=1e-4)
        assert result.raw_probabilities is not None  # the label scores are still reported


def test_probe_picks_c_by_cross_validation_on_its_own_rows():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    gold = ["a", "b"] * 20
    x = rng.normal(size=(40, 6)) + np.array([[1.0 if g == "a" else -1.0] + [0] * 5 for g in gold])
    fitted = probe.fit(x, gold, ["a", "b"])
    z = (x - x.mean(0)) / x.std(0)
    y = [0 if g == "a" else 1 for g in gold]
    scores = {c: cross_val_score(LogisticRegression(C=c, max_iter=5000), z, y, cv=5).mean() for c in probe.GRID}
    assert fitted.c == max(probe.GRID, key=scores.get)
    assert fitted.train_accuracy == pytest.approx(
        LogisticRegression(C=fitted.c, max_iter=5000).fit(z, y).score(z, y))


def test_three_labels_softmax_over_the_probes_rows():
    import numpy as np

    x = np.array([[0, 0], [0, 1], [1, 0], [0, 0.1], [0.1, 1], [1, 0.1]] * 3, dtype=float)
    fitted = probe.fit(x, ["n", "u", "v"] * 6, ["n", "u", "v"])
    p = np.array(fitted.predict(x))
    assert p.shape == (18, 3) and p.sum(1) == pytest.approx(np.ones(18))
    assert list(p.argmax(1)) == [0, 1, 2] * 6


def test_a_fitted_probe_is_cached_and_reused(toy):
    lm = FakeLM()
    builder = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, prompts.BuildOptions(shots=1, selection="first"))
    told = []
    source = probe.Source(rows(TRAIN), None, "train.jsonl", info=told.append)
    first = classify.Classifier(lm, builder, calibrate="probe", probe=source).classify(rows(ITEMS))
    assert len(lm.requests) == 2 * (len(TRAIN) + len(ITEMS))  # two labels per prompt, the first time
    lm = FakeLM()  # a new process: nothing remembered but the cache on disk
    again = classify.Classifier(lm, builder, calibrate="probe", probe=source).classify(rows(ITEMS))
    assert len(lm.requests) == 2 * len(ITEMS)  # the second time: the items only
    assert told == ["fitting the probe: 12 rows of train.jsonl, layers 1, 2 (once; then cached)"]
    assert [r.probabilities for r in again] == [r.probabilities for r in first]
    other = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, prompts.BuildOptions(shots=1, selection="first"))
    other.template.examples.reverse()  # other demonstrations: other states, another probe
    classify.Classifier(lm, other, calibrate="probe", probe=source).classify(rows(ITEMS)[:1])
    assert len(told) == 2


# ---------------------------------------------------------------- the commands


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def test_classify_with_a_probe(fake_lm, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    train = write(tmp_path, "train.jsonl", TRAIN)
    data = write(tmp_path, "data.jsonl", [{"text": "good good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    result = invoke(["classify", "-t", tmpl, "-i", data, "--probe-data", train, "--shots", "1", "-o", "-",
                     "--format", "jsonl", "-v"])
    assert result.exit_code == 0, result.stderr
    out = jsonl(result.stdout)
    assert [(r["prediction"], r["correct"]) for r in out] == [("pos", True), ("neg", True)]
    assert "fitting the probe: 12 rows of" in result.stderr  # -v: the progress log (a terminal shows it too)
    assert "probe (draw 0): 12 rows, layers [1, 2], C " in result.stderr


def test_eval_compares_the_probe_with_calibration(fake_lm, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    train = write(tmp_path, "train.jsonl", TRAIN)
    data = write(tmp_path, "data.jsonl", [{"text": t, "label": lab} for t, lab in
                                          [("good", "pos"), ("so bad", "neg"), ("good one", "pos"), ("bad bad", "neg")]])
    result = invoke(["eval", "-t", tmpl, "--data", data, "--shots", "1", "--calibration", "off,probe",
                     "--probe-data", train, "--probe-size", "8", "-v", "--detail"])
    assert result.exit_code == 0, result.stderr
    table = [line.split()[:8] for line in result.stdout.splitlines()[2:4]]
    assert table[1] == ["toy", "data.jsonl", "1", "probe", "1", "4", "100.0", "100.0"]  # the
    assert table[0][:6] == ["toy", "data.jsonl", "1", "off", "1", "4"]  # fake's states say good/bad outright
    assert "precision/recall %: pos 100/100, neg 100/100" in result.stdout  # --detail: the probe row
    assert "fitting the probe: 8 rows of" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--calibration", "probe", "x"], "--calibration probe needs --probe-data FILE"),
    (["--calibration", "contextual", "--probe-data", "TRAIN", "x"],
     "--probe-data is read only with --calibration probe"),
    (["--probe-data", "missing.jsonl", "x"], "--probe-data file 'missing.jsonl' not found"),
    (["--probe-data", "TRAIN", "--probe-size", "1", "x"], "invalid --probe-size 1"),
    (["--probe-data", "ODD", "x"], "row 2 has label 'meh', not one of the template's labels (pos, neg)"),
    (["--probe-data", "ONE", "x"], "--probe-data has no rows labelled neg: the probe needs examples of every label"),
    (["--method", "generate", "--calibration", "probe", "--probe-data", "TRAIN", "x"],
     "--calibration needs --method score"),
])
def test_probe_mistakes_before_model_time(no_model, tmp_path, args, message):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    files = {"TRAIN": write(tmp_path, "train.jsonl", TRAIN),
             "ODD": write(tmp_path, "odd.jsonl", [TRAIN[0], {"text": "hm", "label": "meh"}]),
             "ONE": write(tmp_path, "one.jsonl", TRAIN[:6])}
    args = [str(files.get(a, a)) for a in args]
    result = invoke(["classify", "-m", "./never-loaded", "-t", tmpl, *args])
    assert result.exit_code == (3 if "not found" in message else 2), result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_probe_layers_out_of_range(fake_lm, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    train = write(tmp_path, "train.jsonl", TRAIN)
    result = invoke(["classify", "-t", tmpl, "--probe-data", train, "--probe-layers", "1,9", "x"])
    assert result.exit_code == 2
    assert "invalid --probe-layers '1,9': this model has layers 0 (embeddings) to 2" in result.stderr


@pytest.mark.parametrize("text, layers, expected", [
    (None, 30, [18, 24, 30]), (None, 2, [1, 2]), ("-1", 30, [30]), ("0,12,-1", 30, [0, 12, 30]), ("3,3", 4, [3]),
])
def test_parse_layers(text, layers, expected):
    assert probe.parse_layers(text, layers) == expected


def test_a_template_can_default_to_its_own_probe(fake_lm, tmp_path):
    write(tmp_path, "rows.jsonl", TRAIN)
    (tmp_path / "toy.yaml").write_text(TEMPLATE + "calibrate: probe\nprobe: rows.jsonl\nshots: 1\n")
    result = invoke(["classify", "-t", tmp_path / "toy.yaml", "-v", "-o", "-", "--format", "jsonl", "so bad"])
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[0]["prediction"] == "neg"
    assert f"fitting the probe: 12 rows of {tmp_path / 'rows.jsonl'}, layers 1, 2" in result.stderr
    result = invoke(["classify", "-t", tmp_path / "toy.yaml", "-v", "--calibration", "off", "so bad"])
    assert result.exit_code == 0 and "probe" not in result.stderr  # a flag wins: no probe is read


@pytest.mark.parametrize("flag", [["--probe-size", "50"], ["--probe-layers", "1"]])
def test_probe_options_without_a_probe(no_model, tmp_path, flag):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["classify", "-m", "./never-loaded", "-t", tmpl, *flag, "x"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {flag[0]} is read only with --calibration probe: add it, or drop {flag[0]}"


def test_an_ensemble_averages_each_draws_own_probe(toy):
    lm = FakeLM()
    source = probe.Source(rows(TRAIN), "1")

    def run(seed, ensemble):
        options = prompts.BuildOptions(shots=2, selection="random", seed=seed)
        builder = prompts.PromptBuilder(toy, lm.tokenizer, lm.window, options)
        clf = classify.Classifier(lm, builder, calibrate="probe", probe=source, ensemble=ensemble)
        return [list(r.probabilities.values()) for r in clf.classify(rows(ITEMS))], clf

    both, clf = run(0, 2)
    (first, _), (second, _) = run(0, 1), run(1, 1)
    assert clf.probe(0) is not clf.probe(1) and first != second  # one probe per draw of demonstrations
    for got, a, b in zip(both, first, second):
        assert got == pytest.approx([(x + y) / 2 for x, y in zip(a, b)])


# ---------------------------------------------------------------- a probe given already fitted (.npz)
def form_of(stderr):
    """The prompt form classify -v names for the probe it fitted."""
    import re

    return re.search(r"prompt form ([0-9a-f]{16})", stderr).group(1)


def fitted_file(tmp_path, form, model="fake", layers=(1, 2), labels=None):
    """The probe classify fitted on TRAIN (from the cache), written as a file naming its model, layers
    and prompt form."""
    from llmlab.backends.loading import cache_root

    [cached] = (cache_root() / "probes").glob("*.npz")
    fitted = probe.Probe.load(cached, ["pos", "neg"])
    fitted.model, fitted.layers = model, list(layers) if layers is not None else None
    fitted.prompt_form = form
    if labels:
        fitted.labels = labels
    path = tmp_path / f"fitted-{model}.npz"
    fitted.save(path)
    return path


def test_a_fitted_probe_file_answers_as_the_fit_did_without_refitting(fake_lm, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    data = write(tmp_path, "data.jsonl", [{"text": t, "label": lab} for t, lab in
                                          [("good good", "pos"), ("bad", "neg"), ("so bad", "neg"), ("good one", "pos")]])
    args = ["classify", "-t", tmpl, "-i", data, "--shots", "1", "-o", "-", "--format", "jsonl", "-v"]
    fitted = invoke([*args, "--probe-data", write(tmp_path, "train.jsonl", TRAIN)])
    assert fitted.exit_code == 0 and "fitting the probe: 12 rows" in fitted.stderr
    scored = len(fake_lm.requests)
    given = invoke([*args, "--probe-data", fitted_file(tmp_path, form_of(fitted.stderr))])
    assert given.exit_code == 0, given.stderr
    assert [r["probabilities"] for r in jsonl(given.stdout)] == [r["probabilities"] for r in jsonl(fitted.stdout)]
    assert "fitting the probe" not in given.stderr
    assert f"probe (draw 0): fitted on 12 rows, read from {tmp_path / 'fitted-fake.npz'}" in given.stderr
    assert len(fake_lm.requests) - scored == 4 * 2  # the 4 rows' 2 labels: no probe row scored again


@pytest.mark.parametrize("make, args, code, message", [
    (dict(model="other"), [], 2, "was fitted on other's hidden states, not fake's: use -m other, or give "
                                 "--probe-data ROWS to fit one for fake"),
    (dict(), ["--probe-layers", "1"], 2, "is a fitted probe, read at layers 1,2; drop --probe-layers"),
    (dict(layers=None), [], 3, "does not record the model, layers and prompts it was fitted on"),
    (dict(labels=["yes", "no"]), [], 3, "not a fitted probe for template 'toy'"),
    (dict(), ["--shots", "2"], 2, "was fitted on the states of other prompts than these (prompt form"),
    (dict(form="0" * 16), [], 2, "(prompt form 0000000000000000, not "),
])
def test_a_fitted_probe_file_that_does_not_fit_is_refused(fake_lm, tmp_path, make, args, code, message):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    first = invoke(["classify", "-t", tmpl, "--probe-data", write(tmp_path, "t.jsonl", TRAIN), "-v", "x"])
    assert first.exit_code == 0
    before = len(fake_lm.requests)
    make = {"form": form_of(first.stderr), **make}
    result = invoke(["classify", "-t", tmpl, "--probe-data", fitted_file(tmp_path, **make), *args, "x"])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len(fake_lm.requests) == before  # refused before anything is scored


def test_eval_refuses_a_probe_fitted_for_another_model_before_any_combination(fake_lm, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    first = invoke(["classify", "-t", tmpl, "--probe-data", write(tmp_path, "t.jsonl", TRAIN), "-v", "x"])
    fitted_file(tmp_path, form_of(first.stderr), model="other")
    (tmp_path / "second.yaml").write_text(TEMPLATE.replace("name: toy", "name: second") +
                                          "calibrate: probe\nprobe: fitted-other.npz\n")
    data = write(tmp_path, "data.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    before = len(fake_lm.requests)
    result = invoke(["eval", "-t", tmpl, "-t", tmp_path / "second.yaml", "--data", data])
    assert result.exit_code == 2 and "was fitted on other's hidden states, not fake's" in result.stderr
    assert len(fake_lm.requests) == before  # the first template was not scored either
