"""`llmlab runs ...` over logged runs, the comparison matrix, and `llmlab compare` on tiny real models."""

import csv
import io
import json

import pytest

import runfixtures
from helpers import invoke, jsonl
from llmlab.orchestration import compare
from llmlab.runs import runlog

SECOND_TEMPLATE = """\
name: sentiment-terse
task: classify
instruction: Positive or negative?
input: "{text} ->"
target: label
labels: {positive: good, negative: bad}
"""



@pytest.fixture
def evals(home):
    return runfixtures.two_evals()


def _items(run_id):
    return runlog.items(runlog.connect(), run_id)


# ---------------------------------------------------------------- the matrix


def _run(run_id, template, values, golds=None, task="classify"):
    items = [{"idx": n, "key": f"index:{n}", "combo": "", "template": template, "prompt": f"p{n}",
              "prediction": v if task == "classify" else None, "output": v if task == "generate" else None,
              "gold": golds[n] if golds else None, "probabilities": None, "extra": {"input": {"text": f"t{n}"}}}
             for n, v in enumerate(values)]
    return {"id": run_id, "command": "classify", "model": "m"}, items


def test_matrix_marks_differing_and_wrong_rows():
    golds = ["a", "b", "a"]
    (ra, ia), (rb, ib) = _run(1, "x", ["a", "b", "b"], golds), _run(2, "y", ["a", "a", "b"], golds)
    m = compare.matrix([ra, rb], lambda rid: ia if rid == 1 else ib)
    assert [c.label for c in m.columns] == ["#1 x", "#2 y"]
    assert [(r.key, r.input, r.differs, r.wrong) for r in m.rows] == [
        ("index:0", "t0", False, False), ("index:1", "t1", True, True), ("index:2", "t2", False, True)]
    assert [(c.metric_name, round(c.metric, 4)) for c in m.columns] == [("accuracy", 0.6667), ("accuracy", 0.3333)]
    assert [r.key for r in compare.select(m, "differing")] == ["index:1"]
    assert [r.key for r in compare.select(m, "wrong")] == ["index:1", "index:2"]


def test_inputs_never_show_the_gold_label_or_its_id():
    """SST-2 rows carry label and label_id: compare, runs compare and the HTML report show the text only."""
    from llmlab.orchestration import report

    run, items = _run(1, "sentiment", ["negative"], ["negative"])
    items[0]["extra"] = {"input": {"id": "r7", "text": "unflinchingly bleak and desperate", "label": "negative",
                                   "label_id": 0, "Label_Text": "neg"}}
    m = compare.matrix([run], lambda rid: items)
    assert [r.input for r in m.rows] == ["unflinchingly bleak and desperate"]
    page = report.render([], m, title="t")
    assert "unflinchingly bleak and desperate</td>" in page and "desperate | " not in page


def test_matrix_generate_scores_rouge_l_and_leaves_missing_cells_empty():
    (ra, ia), (rb, ib) = _run(1, "", ["the cat sat", "a dog"], ["the cat sat", "a dog ran"], "generate"), \
        _run(2, "", ["the cat"], ["the cat sat"], "generate")
    m = compare.matrix([ra, rb], lambda rid: ia if rid == 1 else ib)
    assert m.task == "generate"
    assert m.rows[1].cells[1] is None
    # ROUGE-L F of "a dog" vs "a dog ran": P 1, R 2/3 -> 0.8; mean with the exact match 1.0 -> 0.9
    assert [(c.label, c.metric_name, round(c.metric, 4)) for c in m.columns] == [
        ("#1 m", "rougeL", 0.9), ("#2 m", "rougeL", 0.8)]


# ---------------------------------------------------------------- llmlab runs


def test_runs_list_tsv_newest_first(evals):
    result = invoke(["runs", "list"])
    assert result.exit_code == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [[r[0], *r[2:]] for r in rows] == [
        ["2", "eval", "complete", "tiny-llama", "sentiment-terse", "168", "accuracy 69.4 (4 shots)"],
        ["1", "eval", "complete", "tiny-llama", "sentiment", "168", "accuracy 80.6 (4 shots)"],
    ]


@pytest.mark.parametrize("args, ids", [
    ([], [2, 1]), (["--template", "sentiment"], [1]), (["-t", "sentiment-terse"], [2]),
    (["--command", "generate"], []), (["--model", "tiny"], [2, 1]), (["--model", "gpt2"], []), (["-n", "1"], [2]),
])
def test_runs_list_json_filters(evals, args, ids):
    result = invoke(["runs", "list", "--json", *args])
    assert [r["id"] for r in jsonl(result.stdout)] == ids


def test_runs_show_json_and_items(evals):
    shown = json.loads(invoke(["runs", "show", "1", "--json", "--items"]).stdout)
    assert shown["argv"][:4] == ["llmlab", "eval", "-t", "sentiment"]
    assert shown["template_hashes"] == {"sentiment": runlog.text_hash(
        runfixtures.Template("sentiment", "Classify the sentiment of each movie review.").source_text)}
    assert len(shown["metrics"]["results"]) == 14  # 0 shots x 2 calibrations + (1, 4 shots) x 3 seeds x 2
    assert len(shown["items"]) == 168 and shown["items"][0]["prompt"].startswith("Classify the sentiment")


def test_runs_show_piped_is_key_tab_value(evals):
    lines = invoke(["runs", "show", "2"]).stdout.splitlines()
    assert lines[:4] == ["id\t2", lines[1], "command\teval", "status\tcomplete"]


def test_runs_search(evals):
    found = jsonl(invoke(["runs", "search", "masterpiece"]).stdout)
    assert found and all("masterpiece" in i["prompt"] for i in found)
    assert {i["run_id"] for i in found} == {1, 2}


def test_runs_compare_lists_exactly_the_differing_items(evals):
    result = invoke(["runs", "compare", "1", "2"])
    assert result.exit_code == 0, result.stderr
    *rows, summary = jsonl(result.stdout)
    a = {(i["combo"], i["key"]): i["prediction"] for i in _items(1)}
    b = {(i["combo"], i["key"]): i["prediction"] for i in _items(2)}
    expected = sorted(k for k in a if a[k] != b[k])
    assert sorted((r["combo"], r["key"]) for r in rows) == expected and expected
    assert all(r["#1 sentiment"] != r["#2 sentiment-terse"] for r in rows)
    assert summary["summary"] is True and set(summary["#1 sentiment"]) == {"accuracy"}
    assert f"{len(rows)} of 168 inputs differing" in result.stderr


def test_runs_compare_csv_all(evals):
    result = invoke(["runs", "compare", "1", "2", "--show", "all", "-f", "csv"])
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(table) == 168
    assert list(table[0])[:4] == ["combo", "key", "input", "gold"]


def test_runs_export_jsonl_and_csv(evals, tmp_path):
    lines = jsonl(invoke(["runs", "export", "2"]).stdout)
    assert len(lines) == 168 and lines[0]["run_id"] == 2 and "probabilities" in lines[0]
    out = tmp_path / "run.csv"
    assert invoke(["runs", "export", "2", "-o", out]).exit_code == 0
    table = list(csv.DictReader(out.open()))
    assert len(table) == 168 and json.loads(table[0]["probabilities"])


def test_runs_path_and_rm(evals, home):
    assert invoke(["runs", "path"]).stdout == f"{home / 'runs.db'}\n"
    result = invoke(["runs", "rm", "1"])
    assert result.exit_code == 0 and "deleted run 1" in result.stderr
    assert [r["id"] for r in jsonl(invoke(["runs", "list", "--json"]).stdout)] == [2]


@pytest.mark.parametrize("args, code, message", [
    (["runs", "show", "9"], 3, "no run 9 in"),
    (["runs", "rm", "2", "9"], 3, "no run 9 in"),
    (["runs", "compare", "1"], 2, "give two or more run ids"),
    (["runs", "compare", "1", "2", "--show", "some"], 2, "invalid --show 'some': choose all, differing, wrong"),
    (["runs", "export", "1", "-f", "xml"], 2, "invalid --format 'xml'"),
    (["report", "1", "-o", "/no/such/dir/r.html"], 3, "--output '/no/such/dir/r.html': folder '/no/such/dir' does not exist"),
])
def test_runs_mistakes_are_one_line(evals, args, code, message):
    result = invoke(args)
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert len(runlog.list_runs(runlog.connect())) == 2  # nothing deleted by a failed rm


def test_no_log_yet(home):
    result = invoke(["runs", "list"])
    assert result.exit_code == 2 and "no run log yet" in result.stderr


# ---------------------------------------------------------------- llmlab compare (tiny real models)


def test_compare_two_templates_classify(tiny_models, home, tmp_path):
    terse = tmp_path / "terse.yaml"
    terse.write_text(SECOND_TEMPLATE)
    page = tmp_path / "m.html"
    result = invoke(["compare", "-m", tiny_models["llama"], "-t", "sentiment", "-t", terse, "-i", runfixtures.DATA,
                     "--limit", 4, "--html", page])
    assert result.exit_code == 0, result.stderr
    *rows, summary = jsonl(result.stdout)
    assert [r["key"] for r in rows] == ["id:r1", "id:r2", "id:r3", "id:r4"]
    for label in ("sentiment", "sentiment-terse"):
        marks = [r[f"{label} correct"] for r in rows]
        assert marks == [r[label] == r["gold"] for r in rows]
        assert summary[label] == {"accuracy": sum(marks) / 4}
    assert [(e["row"], e["baseline"], e["n"], e["test"]) for e in summary["paired"]] == [
        ("sentiment-terse", "sentiment", 4, "mcnemar")]
    runs = runlog.list_runs(runlog.connect())
    assert [(r["command"], r["status"], r["n_items"], r["templates"][0]["name"]) for r in runs] == [
        ("compare", "complete", 4, "sentiment-terse"), ("compare", "complete", 4, "sentiment")]
    assert runs[0]["model"] == str(tiny_models["llama"]) and runs[1]["metrics"] == summary["sentiment"]
    logged = _items(runs[1]["id"])
    assert logged[0]["prompt"].startswith("Classify the sentiment") and logged[0]["prediction"] == rows[0]["sentiment"]
    assert "sentiment-terse" in page.read_text()


def test_compare_two_models_generate_no_log(tiny_models, home, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "Where is Ganymede?", "answer": "Jupiter"}\n{"prompt": "the film", "answer": "was"}\n')
    result = invoke(["compare", "-m", tiny_models["llama"], "-m", tiny_models["gpt2"], "-i", data,
                     "--reference", "answer", "--max-new-tokens", 3, "--no-log", "-f", "csv"])
    assert result.exit_code == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["gold"] for r in table] == ["Jupiter", "was"]
    assert set(table[0]) == {"combo", "key", "input", "gold", "tiny-llama", "tiny-gpt2"}
    assert not (home / "runs.db").exists()


@pytest.mark.parametrize("args, message", [
    (["-t", "sentiment"], "nothing to compare: give two or more --template, --model or --config"),
    (["-t", "sentiment", "-t", "qa"], "mixed tasks"),
    (["-t", "sentiment", "-t", "news-topic", "--show", "odd"], "invalid --show 'odd'"),
    (["-t", "sentiment", "-t", "sentiment-terse", "--baseline", "qa"],
     "--baseline 'qa' is not a compared variant: choose one of 'sentiment', 'sentiment-terse'"),
])
def test_compare_mistakes_fail_before_loading(home, args, message):
    result = invoke(["compare", "-m", "/no/such/model", "-i", runfixtures.DATA, *args])
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_matrix_orders_combinations_numerically():
    items = [{"idx": 0, "key": "index:0", "combo": runlog.combo(s, 0), "template": "t", "prompt": "p", "prediction": "a",
              "output": None, "gold": "a", "probabilities": None, "extra": None} for s in (16, 4, 0)]
    m = compare.matrix([{"id": 1}], lambda _: items)
    assert [r.combo for r in m.rows] == ["shots=0 seed=0", "shots=4 seed=0", "shots=16 seed=0"]


def test_cli_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, llmlab.commands.cli; heavy = {'torch', 'transformers', 'sqlite3', 'matplotlib', 'rouge_score', "
            "'llmlab.runs.runlog', 'llmlab.orchestration.report', 'llmlab.orchestration.compare'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    commands = subprocess.run([sys.executable, "-m", "llmlab", "--help"], capture_output=True, text=True, timeout=60)
    assert all(name in commands.stdout for name in ("runs", "compare", "report"))


# ---------------------------------------------------------------- paired differences against a baseline

GOLD = ["positive", "negative"] * 10
RIGHT = {"base": [1] * 12 + [0] * 8, "better": [1] * 18 + [0] * 2, "same": [1] * 10 + [0] * 2 + [1] * 2 + [0] * 6}


def _logged(name):
    """A classify run right on the rows RIGHT[name] marks (20 rows); its run id."""
    flip = {"positive": "negative", "negative": "positive"}
    with runlog.open_run("classify", ["llmlab", "classify"], {}, model="m", templates=None, data="d.jsonl") as log:
        for n, (gold, right) in enumerate(zip(GOLD, RIGHT[name])):
            log.item(n, f"p{n}", prediction=gold if right else flip[gold], gold=gold, key=f"id:{n}",
                     extra={"input": {"text": f"t{n}"}})
    return log.id


def _by_hand(a, b, seed=0):
    """Difference, 95% percentile bootstrap interval (10,000 resamples of the rows, numpy seed 0) and
    McNemar's exact p from scipy's binomial test."""
    import numpy as np
    from scipy.stats import binomtest

    d = np.array(b, float) - np.array(a, float)
    means = d[np.random.default_rng(seed).integers(0, d.size, size=(10_000, d.size))].mean(axis=1)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return d.mean(), *np.percentile(means, [2.5, 97.5]), p


def test_paired_differences_equal_a_computation_by_hand_and_are_holm_corrected(home):
    ids = [_logged("better"), _logged("base"), _logged("same")]
    m = compare.matrix([runlog.get_run(runlog.connect(), i) for i in ids], _items)
    entries = compare.paired(m, compare.baseline_column(m, str(ids[1]), run_ids=True))
    assert [(e["row"], e["baseline"], e["n"], e["test"]) for e in entries] == [(0, 1, 20, "mcnemar"), (2, 1, 20, "mcnemar")]
    hand = [_by_hand(RIGHT["base"], RIGHT[name]) for name in ("better", "same")]
    for e, (diff, low, high, p) in zip(entries, hand):
        assert (e["difference"], e["low"], e["high"], e["p"]) == pytest.approx((diff, low, high, p))
    # Holm over two: the smaller p times 2, the larger times 1 (never below the first)
    small, large = sorted(h[3] for h in hand)
    assert sorted(e["p_holm"] for e in entries) == pytest.approx([min(1, 2 * small), max(min(1, 2 * small), large)])
    assert hand[0][3] == pytest.approx(0.03125)  # 6 rows only the better run gets right, none the other way


def test_runs_compare_shows_paired_differences_against_the_baseline_run(home):
    ids = [_logged("base"), _logged("better"), _logged("same")]
    result = invoke(["runs", "compare", *map(str, ids), "--show", "all", "-f", "csv"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "20 of 20 inputs shown\n"
        "Paired differences against #1 m (95% bootstrap CI; p Holm-corrected over these rows)\n"
        "variant  vs    diff (points)  95% paired CI   p (Holm)  test\n"
        "#2 m     #1 m  +30.0          [+10.0, +50.0]  0.0625    mcnemar\n"
        "#3 m     #1 m  +0.0           [-20.0, +20.0]  1         mcnemar\n")
    summary = jsonl(invoke(["runs", "compare", *map(str, ids), "--baseline", str(ids[1])]).stdout)[-1]
    assert [(e["row"], e["baseline"], round(e["difference"], 4), e["test"]) for e in summary["paired"]] == [
        ("#1 m", "#2 m", -0.3, "mcnemar"), ("#3 m", "#2 m", -0.3, "mcnemar")]


@pytest.mark.parametrize("args, message", [
    (["--baseline", "7"], "--baseline 7 is not one of the compared runs (1, 2)"),
])
def test_runs_compare_refuses_a_baseline_it_does_not_compare(home, args, message):
    _logged("base"), _logged("better")
    result = invoke(["runs", "compare", "1", "2", *args])
    assert result.exit_code == 2 and result.stderr.strip().endswith(message) and result.stdout == ""
