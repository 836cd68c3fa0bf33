"""llmlab tune and adapters as models (--adapter DIR, -m BASE+DIR), on tiny random models."""

import json
from pathlib import Path

import pytest

from helpers import invoke, jsonl

REVIEWS = [("a charming film", "positive"), ("bleak and dull", "negative"), ("loved it", "positive"),
           ("two dull hours", "negative"), ("warm and funny", "positive"), ("a mess", "negative"),
           ("great fun", "positive"), ("boring", "negative")]


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in REVIEWS))
    return path


@pytest.fixture
def dialogues(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    rows = [{"dialogue": f"#Person1#: hello {n}\n#Person2#: hi", "summary": f"they greet {n}"} for n in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tune(model, data, out, *extra):
    return invoke(["tune", "-t", "sentiment", "--data", data, "-m", model, "-o", out, "--k", "8", "--steps", "2",
                   "--eval-every", "1", "-q", *extra])


def probabilities(result):
    return [r["probabilities"] for r in jsonl(result.stdout)]


# ---------------------------------------------------------------- mistakes, one line, before any model time


def test_refusals_before_any_model_time(no_model, reviews, tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "plain.yaml").write_text("name: plain\ntask: generate\ninput: '{text}'\n")
    base = ["tune", "-t", "sentiment", "--data", reviews, "-o", tmp_path / "new"]
    cases = [
        (["tune", "-t", "sentiment", "--data", tmp_path / "nope.jsonl", "-o", tmp_path / "new"],
         f"error: --data '{tmp_path / 'nope.jsonl'}' not found; give a JSONL or CSV file of labelled rows\n", 3),
        (base + ["--k", "9"], f"error: --k 9: {reviews} has only 8 rows; use --k 8 or less\n", 2),
        (["tune", "-t", tmp_path / "plain.yaml", "--data", reviews, "-o", tmp_path / "new"],
         "error: template 'plain' has no target field: give the field holding the text to learn with "
         "--target FIELD\n", 2),
        (["tune", "-t", "sentiment", "--data", reviews, "-o", tmp_path / "exists"],
         f"error: -o '{tmp_path / 'exists'}' already exists; choose a new folder (an adapter is never "
         "overwritten)\n", 3),
        (base + ["-m", "smollm2+" + str(tmp_path / "exists")],
         f"error: -m 'smollm2+{tmp_path / 'exists'}' names an adapter; tune trains a new one on a base model: "
         "give the base alone\n", 2),
        (base + ["--k", "0"], "error: invalid --k 0: must be >= 1\n", 2),
        (["tune", "-t", "dialogue-summary-flan", "--data", reviews, "-o", tmp_path / "new"],
         f"error: {reviews}: rows have no 'dialogue' field, which template 'dialogue-summary-flan' needs\n", 3),
        (["classify", "-t", "sentiment", "good", "--adapter", tmp_path / "missing"],
         f"error: adapter folder '{tmp_path / 'missing'}' not found; train one with `llmlab tune ... -o "
         f"{tmp_path / 'missing'}`\n", 4),
        (["classify", "-t", "sentiment", "good", "--adapter", tmp_path / "exists"],
         f"error: '{tmp_path / 'exists'}' is not an llmlab adapter (no llmlab_adapter.json and "
         "adapter_config.json in it); give a folder written by `llmlab tune`\n", 4),
    ]
    for args, expected, code in cases:
        result = invoke(args)
        assert (result.stderr, result.exit_code) == (expected, code), args
        assert result.stdout == ""
    assert not (tmp_path / "new").exists()


def test_the_k_rows_are_drawn_like_balanced_shots(reviews):
    from llmlab.io.records import read_items
    from llmlab.prompting.prompts import find_template, select_shots
    from llmlab.tuning import plan

    items, template = read_items(str(reviews), text_field="text"), find_template("sentiment")
    rows = plan.draw(items, template, 4, seed=3)
    expected = select_shots(template, [i.fields for i in items], 4, "balanced", 3)
    assert [r.index for r in rows] == expected
    assert sorted(r.fields["label"] for r in rows) == ["negative", "negative", "positive", "positive"]
    assert plan.draw(items, template, 4, seed=3) == rows and plan.draw(items, template, 4, seed=4) != rows
    train, held = plan.split(rows * 2, 0.25, 0)
    assert (len(train), len(held)) == (6, 2) and plan.split(rows[:3], 0.5, 0) == (rows[:3], [])


# ---------------------------------------------------------------- training and reloading (tiny models)


def _examples(model_dir, data):
    from llmlab.backends import models
    from llmlab.core.config import ModelConfig, PromptConfig
    from llmlab.io.records import read_items
    from llmlab.orchestration.session import Session
    from llmlab.prompting.prompts import find_template
    from llmlab.tuning import train

    lm = models.load(str(model_dir), "cpu")
    template = find_template("sentiment")
    builder = Session(ModelConfig(str(model_dir)), lm).builder(template, PromptConfig("sentiment", 0), 3, None)
    items = read_items(str(data), text_field="text")
    return lm, builder, train.examples(lm, builder, template, "label", items)


@pytest.mark.slow
def test_a_lora_step_lowers_the_loss_on_its_batch(tiny_models, reviews):
    import torch

    from llmlab.backends.trainable import AdapterSettings, Trainable
    from llmlab.tuning import train

    _, _, rows = _examples(tiny_models["llama"], reviews)
    lm = _examples(tiny_models["llama"], reviews)[0]
    model = Trainable(lm, AdapterSettings("lora"), seed=0)
    assert 0 < model.trainable < model.total
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before, _ = train.loss(model, rows)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = train.loss(model, rows)
    assert after.item() < before.item() - 1e-3


@pytest.mark.slow
def test_adapter_equals_merging_it_by_hand_and_reloads_identically(tiny_models, reviews, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmlab.backends.hf import HFLM
    from llmlab.io.records import read_items
    from llmlab.scoring.classify import Classifier

    base = tiny_models["llama"]
    assert tune(base, reviews, tmp_path / "ad", "--lr", "0.05").exit_code == 0
    record = json.loads((tmp_path / "ad" / "llmlab_adapter.json").read_text())
    assert (record["method"], record["k"], record["train_rows"], record["held_out_rows"]) == ("lora", 8, 6, 2)
    assert record["trainable_params"] > 0 and record["status"] in ("all steps", "early stopping")
    result = invoke(["classify", "-t", "sentiment", "-i", reviews, "--adapter", tmp_path / "ad", "-m", base,
                     "-f", "jsonl", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    same = invoke(["classify", "-t", "sentiment", "-i", reviews, "-m", f"{base}+{tmp_path / 'ad'}", "-f", "jsonl",
                   "--device", "cpu"])
    plain = invoke(["classify", "-t", "sentiment", "-i", reviews, "-m", base, "-f", "jsonl", "--shots", "0",
                    "--calibration", "off", "--device", "cpu"])
    assert probabilities(same) == probabilities(result) != probabilities(plain)

    lm, builder, _ = _examples(base, reviews)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad").merge_and_unload()
    by_hand = Classifier(HFLM("by hand", merged.eval(), lm.tokenizer, "cpu"), builder)
    items = read_items(str(reviews), text_field="text")
    rounded = [{k: round(v, 6) for k, v in r.probabilities.items()} for r in by_hand.classify(items)]
    assert rounded == probabilities(result)  # records keep 6 decimals
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad").eval()
    reloaded = Classifier(HFLM("peft", unmerged, lm.tokenizer, "cpu"), builder, batch_size=1)
    for got, want in zip([r.probabilities for r in reloaded.classify(items)], probabilities(result)):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ia3", "prompt"])
def test_ia3_and_prompt_tuning_train_and_reload(tiny_models, reviews, tmp_path, method):
    base = tiny_models["llama"]
    result = tune(base, reviews, tmp_path / method, "--method", method, "--lr", "0.05")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["method"] == method
    runs = [invoke(["classify", "-t", "sentiment", "-i", reviews, "-m", model, "-f", "jsonl", "--shots", "0",
                    "--calibration", "off", "--device", "cpu"]) for model in (f"{base}+{tmp_path / method}",) * 2 + (base,)]
    assert all(r.exit_code == 0 for r in runs), [r.stderr for r in runs]
    assert probabilities(runs[0]) == probabilities(runs[1]) != probabilities(runs[2])


@pytest.mark.slow
def test_a_different_base_is_refused_before_its_weights(tiny_models, reviews, tmp_path):
    assert tune(tiny_models["llama"], reviews, tmp_path / "ad").exit_code == 0
    result = invoke(["classify", "-t", "sentiment", "good", "-m", tiny_models["gpt2"], "--adapter", tmp_path / "ad"])
    assert result.exit_code == 4
    assert result.stderr == (f"error: adapter '{tmp_path / 'ad'}' was trained on '{tiny_models['llama']}', not "
                             f"'{tiny_models['gpt2']}' (model_type llama vs gpt2): use -m "
                             f"{tiny_models['llama']}+{tmp_path / 'ad'}\n")


@pytest.mark.slow
def test_encoder_decoder_learns_a_generate_templates_target(tiny_models, dialogues, tmp_path):
    t5 = tiny_models["t5"]
    result = invoke(["tune", "-t", "dialogue-summary-flan", "--data", dialogues, "-m", t5, "-o", tmp_path / "sum",
                     "--k", "6", "--steps", "3", "--eval-every", "1", "-q"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["task"], record["target"], record["held_out_rows"]) == ("generate", "summary", 2)
    assert record["held_out_loss"] > 0 and record["held_out_accuracy"] is None
    out = invoke(["generate", "-t", "dialogue-summary-flan", "-i", dialogues, "--adapter", tmp_path / "sum", "-m", t5,
                  "--max-new-tokens", "4", "-f", "jsonl", "--device", "cpu"])
    assert out.exit_code == 0, out.stderr
    assert len(jsonl(out.stdout)) == 6
    prompt = invoke(["tune", "-t", "dialogue-summary-flan", "--data", dialogues, "-m", t5, "-o", tmp_path / "pt",
                     "--k", "6", "--method", "prompt"])
    assert (prompt.exit_code, prompt.stderr) == (4, "error: --method prompt runs on decoder-only models here; use "
                                                    "lora or ia3 for an encoder-decoder model\n")


@pytest.mark.slow
def test_models_lists_adapters_under_a_folder(tiny_models, reviews, tmp_path):
    assert tune(tiny_models["llama"], reviews, tmp_path / "adapters" / "one").exit_code == 0
    result = invoke(["models", "--adapters", tmp_path / "adapters", "-f", "jsonl"])
    rows = [r for r in jsonl(result.stdout) if r["kind"] == "adapter"]
    assert [(r["name"], r["where"]) for r in rows] == [
        (f"{tiny_models['llama']}+{tmp_path / 'adapters' / 'one'}", str(tmp_path / "adapters" / "one"))]
    assert rows[0]["size"] == (tmp_path / "adapters" / "one" / "adapter_model.safetensors").stat().st_size


@pytest.mark.slow
def test_eval_puts_adapters_beside_in_context_rows(tiny_models, reviews, tmp_path):
    from llmlab.backends import adapters

    base = tiny_models["llama"]
    assert tune(base, reviews, tmp_path / "ad").exit_code == 0
    result = invoke(["eval", "-t", "sentiment", "--data", reviews, "-m", base, "--shots", "0,2", "--calibration", "off",
                     "--adapter", tmp_path / "ad", "--report", tmp_path / "r.json", "--device", "cpu", "--no-log"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["model"], r["shots"]) for r in rows] == [(str(base), 0), (str(base), 2), (f"{base}+{tmp_path / 'ad'}", 0)]
    record = adapters.read_record(tmp_path / "ad")
    n = sum(p.numel() for p in _model(base).parameters())
    icl, adapter = rows[1]["cost"], rows[2]["cost"]
    assert (icl["k"], icl["trainable_params"], icl["train_seconds"], icl["adapter_bytes"]) == (2, 0, None, None)
    assert (adapter["k"], adapter["trainable_params"], adapter["train_seconds"]) == (
        8, record["trainable_params"], record["train_seconds"])
    assert adapter["adapter_bytes"] == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert adapter["parameters"] == n and adapter["flops_per_item"] == 2 * n * adapter["prompt_tokens"]
    assert icl["prompt_tokens"] > adapter["prompt_tokens"] > 0  # two demonstrations make longer prompts
    correct = [rows[0]["runs"][0]["metrics"]["correct"], rows[2]["runs"][0]["metrics"]["correct"]]
    diff = (sum(correct[1]) - sum(correct[0])) / len(REVIEWS)
    assert adapter["vs_in_context"]["diff"] == diff and adapter["vs_in_context"]["baseline"].startswith("0 shots")
    assert "Δ acc vs in-context [95% CI]" in result.stdout and "8,192" in result.stdout


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _stop(how):
    """Ctrl-C, or a real SIGTERM sent to this process (only once tune has made it a clean exit: without
    that handler the default action would end the whole test run, so its absence fails here instead)."""
    import os
    import signal

    from llmlab.io import locks

    if how == "ctrl-c":
        raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is locks._on_sigterm, "tune does not handle SIGTERM"
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("how, raised", [("ctrl-c", KeyboardInterrupt), ("sigterm", SystemExit)])
def test_ctrl_c_or_sigterm_keeps_the_last_checkpoint(tiny_models, reviews, tmp_path, how, raised):
    import contextlib
    import signal

    from llmlab.core.config import ModelConfig, TuneConfig
    from llmlab.orchestration.session import Hooks
    from llmlab.tuning import train

    class Bar:
        steps = 0

        def advance(self, n=1):
            Bar.steps += n
            if Bar.steps == 3:
                _stop(how)

        def describe(self, text):
            pass

    hooks = Hooks(progress=lambda total, what: contextlib.nullcontext(Bar()))
    cfg = TuneConfig(ModelConfig(str(tiny_models["llama"]), "cpu"), "sentiment", str(reviews), str(tmp_path / "ad"),
                     k=8, steps=10, eval_every=1, lr=0.05)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised):
        train.tune(cfg, hooks)
    assert signal.getsignal(signal.SIGTERM) is before  # given back
    record = json.loads((tmp_path / "ad" / "llmlab_adapter.json").read_text())
    assert (record["status"], record["steps_done"]) == ("interrupted", 3)
    assert record["best_step"] in (1, 2) and not (tmp_path / "ad.writing").exists()
    result = invoke(["classify", "-t", "sentiment", "good", "--adapter", tmp_path / "ad", "-m", tiny_models["llama"],
                     "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("scores, kept", [
    ([(2.0, 0.5), (1.0, 0.5), (3.0, 0.75), (0.5, 0.6)], [True, True, True, False]),  # accuracy first, then loss
    ([(2.0, None), (1.5, None), (1.7, None)], [True, True, False]),  # generate templates: the loss alone
])
def test_the_best_step_is_the_most_accurate_then_the_lowest_loss(scores, kept):
    from types import SimpleNamespace

    from llmlab.tuning.checkpoint import Saver

    saver = Saver(None, None, SimpleNamespace(lm=None), False)
    assert [saver.better(s) for s in scores] == kept


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_training_scores_the_tokens_classify_scores(tiny_models, reviews, kind):
    """Before any step a LoRA adapter changes nothing (its B is zero), so the training forward pass
    must give exactly the label log-probabilities the scorer gives for the same prompts."""
    import torch

    from llmlab.backends.base import LLRequest
    from llmlab.backends.trainable import AdapterSettings, Trainable

    lm, builder, rows = _examples(tiny_models[kind], reviews)
    prompts = [builder.build(i) for i in read_reviews(reviews)]
    requests = [LLRequest(p.text, p.answer_prefix + v, p.chat, prefix=p.prefix, context_ids=p.ids)
                for p in prompts for v in ("Positive", "Negative")]
    scored = [o.logprob for o in lm.loglikelihood(requests)]
    model = Trainable(lm, AdapterSettings("lora"), seed=0)
    with torch.no_grad():
        trained = [float(lp.sum()) for lp in model.logprobs([row for ex in rows for row in ex.rows])]
    assert trained == pytest.approx(scored, abs=1e-4)
    assert [ex.gold for ex in rows] == [0 if label == "positive" else 1 for _, label in REVIEWS]


def read_reviews(path):
    from llmlab.io.records import read_items

    return read_items(str(path), text_field="text")


# ---------------------------------------------------------------- --adapter on compare, next and lab


@pytest.mark.slow
def test_adapter_flag_on_next_lab_and_compare(tiny_models, reviews, tmp_path):
    """--adapter DIR is -m BASE+DIR on next and lab; compare puts BASE+DIR beside BASE, scored on the
    prompts the adapter was trained on, exactly as classify --adapter scores them."""
    base, ad = tiny_models["llama"], tmp_path / "ad"
    assert tune(base, reviews, ad, "--lr", "0.05").exit_code == 0
    for command, extra in ((["next", "the movie was", "--show", "3", "-f", "jsonl"], None),
                           (["lab"], "/set max_new_tokens 3\n/set top_logprobs 2\nthe movie was\n/quit\n")):
        flag, spec, plain = (invoke([*command, "-m", m, *a], input=extra)
                             for m, a in ((base, ["--adapter", ad]), (f"{base}+{ad}", []), (base, [])))
        assert flag.exit_code == spec.exit_code == 0, flag.stderr + spec.stderr
        assert flag.stdout == spec.stdout != plain.stdout
    result = invoke(["compare", "-t", "sentiment", "-i", reviews, "-m", base, "--adapter", ad, "--no-log",
                     "-f", "jsonl", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    *rows, summary = jsonl(result.stdout)
    classified = jsonl(invoke(["classify", "-t", "sentiment", "-i", reviews, "-m", base, "--adapter", ad,
                               "-f", "jsonl", "--device", "cpu"]).stdout)
    assert [r["ad"] for r in rows] == [r["prediction"] for r in classified]
    assert {"tiny-llama", "ad"} <= set(summary)
    assert summary["ad"]["accuracy"] == sum(r["ad"] == r["gold"] for r in rows) / len(rows)


@pytest.mark.parametrize("command", [["next", "hello"], ["lab"], ["compare", "-t", "sentiment", "-i", "x.jsonl"]])
def test_adapter_flag_missing_folder_is_one_line(no_model, tmp_path, command):
    result = invoke([*command, "--adapter", tmp_path / "none"], input="/quit\n")
    assert (result.exit_code, result.stdout) == (4, "")
    assert result.stderr == (f"error: adapter folder '{tmp_path / 'none'}' not found; train one with "
                             f"`llmlab tune ... -o {tmp_path / 'none'}`\n")


@pytest.mark.slow
def test_tune_is_logged_as_a_run(tiny_models, reviews, tmp_path, home):
    from llmlab.runs import runlog

    base = tiny_models["llama"]
    result = tune(base, reviews, tmp_path / "ad")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    [run] = runlog.list_runs(runlog.connect())
    assert (run["command"], run["status"], run["model"], run["data"], run["templates"][0]["name"]) == (
        "tune", "complete", str(base), str(reviews), "sentiment")
    assert 0 < record["train_cpu_seconds"] and 0 < record["train_seconds"]
    assert run["config"]["k"] == 8 and run["config"]["method"] == "lora" and run["config"]["output"] == str(tmp_path / "ad")
    assert run["metrics"] == {"adapter": str(tmp_path / "ad"), **{k: record[k] for k in (
        "method", "k", "seed", "train_rows", "held_out_rows", "settings", "trainable_params", "train_seconds",
        "train_cpu_seconds", "steps_done", "best_step", "held_out_loss", "held_out_accuracy", "last_train_loss", "status")}}
    assert tune(base, reviews, tmp_path / "quiet", "--no-log").exit_code == 0
    assert len(runlog.list_runs(runlog.connect())) == 1


# ---------------------------------------------------------------- learning curves (llmlab report)

CURVES = {  # (method or None for in-context, k, seed) -> accuracy
    **{(None, k, s): 0.70 + 0.01 * s + k / 10_000 for k in (16, 64, 256) for s in range(3)},
    **{("lora", k, s): 0.60 + 0.02 * s + k / 1_000 for k in (16, 64, 256) for s in range(3)},
    **{("ia3", 64, s): 0.65 + 0.03 * s for s in range(2)},
}


@pytest.fixture
def curve_runs(home):
    """One logged eval per k and seed, as `eval --adapter` logs them: the in-context row (4 shots and a
    probe on k - 4 rows) and the adapters trained on the same k rows."""
    from llmlab.runs import runlog

    ids = []
    for k, seed in sorted({(k, s) for _, k, s in CURVES}):
        with runlog.open_run("eval", argv=["llmlab", "eval"]) as log:
            log.result("sentiment", "classify", 4, 0, "probe", {"accuracy": CURVES[(None, k, seed)]}, k=k)
            for method in ("lora", "ia3"):
                if (method, k, seed) in CURVES:
                    log.result("sentiment", "classify", 0, 0, "off", {"accuracy": CURVES[(method, k, seed)]}, k=k,
                               adapter=f"ad/{method}-{k}-{seed}", tuned={"method": method, "seed": seed})
            ids.append(log.id)
    return ids


def test_learning_curves_are_mean_and_std_over_seeds_per_method(curve_runs, tmp_path):
    import statistics

    from PIL import Image

    from llmlab.orchestration import report
    from llmlab.runs import runlog

    db = runlog.connect()
    series = report.learning([runlog.get_run(db, i) for i in curve_runs])
    assert [s["label"] for s in series] == ["sentiment: ia3", "sentiment: in-context, 4 shots, probe",
                                            "sentiment: lora"]
    want = {method: [(k, statistics.fmean(v), statistics.stdev(v), 3) for k in (16, 64, 256)
                     for v in [[CURVES[(method, k, s)] for s in range(3)]]] for method in (None, "lora")}
    assert series[1]["points"] == want[None] and series[2]["points"] == want["lora"]
    assert series[0]["points"] == [(64, statistics.fmean([0.65, 0.68]), statistics.stdev([0.65, 0.68]), 2)]
    assert report.sweep([runlog.get_run(db, curve_runs[0])])[0]["points"] == [(4, CURVES[(None, 16, 0)], 0.0, 1)]
    pytest.importorskip("matplotlib")
    page, folder = tmp_path / "r.html", tmp_path / "png"
    result = invoke(["report", *curve_runs, "-o", page, "--png", folder])
    assert result.exit_code == 0, result.stderr
    text = page.read_text()
    assert "<h2>Learning curves</h2>" in text and "sentiment: lora: k (labelled rows) 256, " \
        f"{want['lora'][2][1] * 100:.1f} ± {want['lora'][2][2] * 100:.1f}" in text
    curve = Image.open(folder / "learning-curves.png")
    assert curve.size == (700, 400) and len(curve.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


@pytest.mark.slow
def test_eval_with_adapters_logs_what_the_learning_curves_need(tiny_models, reviews, tmp_path, home):
    from llmlab.orchestration import report
    from llmlab.runs import runlog

    base = tiny_models["llama"]
    assert tune(base, reviews, tmp_path / "ad", "--no-log").exit_code == 0
    result = invoke(["eval", "-t", "sentiment", "--data", reviews, "-m", base, "--shots", "2", "--calibration",
                     "probe", "--probe-data", reviews, "--adapter", tmp_path / "ad", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    [run] = runlog.list_runs(runlog.connect())
    logged = run["metrics"]["results"]
    assert [(r["shots"], r["k"], r.get("tuned")) for r in logged] == [(2, 2 + 8, None), (0, 8, {"method": "lora", "seed": 0})]
    series = report.learning([run])
    assert [(s["label"], [p[0] for p in s["points"]]) for s in series] == [
        ("sentiment: in-context, 2 shots, probe", [10]), ("sentiment: lora", [8])]
    assert [s["points"][0][1] for s in series] == [r["metrics"]["accuracy"] for r in logged]


@pytest.mark.slow
def test_prompt_tuned_scoring_batches_rows_of_one_width_as_one_row_per_pass_scores(tiny_models, reviews, tmp_path):
    """A prompt-tuned model scores rows of equal width together (no padding, which its virtual tokens
    could not sit behind): the same log-probabilities as one row per forward pass."""
    from llmlab.backends import models
    from llmlab.backends.adapters import PromptTunedLM
    from llmlab.backends.base import LLRequest
    from llmlab.backends.hf import HFLM

    assert tune(tiny_models["llama"], reviews, tmp_path / "pt", "--method", "prompt", "--lr", "0.05").exit_code == 0
    lm = models.load(f"{tiny_models['llama']}+{tmp_path / 'pt'}", "cpu")
    assert isinstance(lm, PromptTunedLM)
    texts = ["a good film", "a bad film", "so dull", "so fun", "the best one I have seen", "it drags on and on"]
    requests = [LLRequest(f"Review: {t}\nSentiment:", c) for t in texts for c in (" Positive", " Negative", " Meh ok")]
    one_by_one = HFLM.loglikelihood(lm, requests, 1, False)
    batched = lm.loglikelihood(requests, 16)
    assert [o.tokens for o in batched] == [o.tokens for o in one_by_one]
    assert [o.logprob for o in batched] == pytest.approx([o.logprob for o in one_by_one], abs=1e-4)
    assert [o.greedy for o in batched] == [o.greedy for o in one_by_one]
