"""`llmlab eval` from the command line: one table over templates with their own data, what each
number means, the JSON report, and data / path mistakes caught before any model time."""

import json
import re

import pytest

from helpers import invoke
from test_classify import ITEMS, TEMPLATE

CAPTION = ["mean ± std over seeds; items/s: mean over seeds (a calibration method after the first reuses the",
           "label scores: its items/s counts only its own work); --detail: min–max, per-label precision/recall",
           "and confusion; --report FILE: every number as JSON"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


@pytest.fixture
def toy(tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    return tmpl


def test_eval_table_and_report(tiny_models, data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    report = tmp_path / "report.json"
    result = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--shots", "0,2", "--seeds", 2,
                     "--calibration", "both", "--report", report, "--log-samples"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{tiny_models['llama']} on data.jsonl (5 items)"
    assert lines[1].split()[:9] == ["template", "data", "shots", "calibration", "seeds", "n", "accuracy", "%", "macro-F1"]
    assert [line.split()[:6] for line in lines[2:6]] == [
        ["toy", "data.jsonl", "0", "off", "1", "5"], ["toy", "data.jsonl", "0", "contextual", "1", "5"],
        ["toy", "data.jsonl", "2", "off", "2", "5"], ["toy", "data.jsonl", "2", "contextual", "2", "5"]]
    assert lines[6:9] == CAPTION
    # the paired table: every row against the first (same rows), interval and Holm p
    assert lines[9] == ("Paired differences against the first row on the same data (95% bootstrap CI; p "
                        "Holm-corrected over these rows)")
    assert lines[10].split()[:4] == ["combination", "vs", "(first", "on"]
    assert [line.split()[:6] for line in lines[11:]] == [
        ["toy", "0-shot", "contextual", "toy", "0-shot", "off"], ["toy", "2-shot", "off", "toy", "0-shot", "off"],
        ["toy", "2-shot", "contextual", "toy", "0-shot", "off"]]
    doc = json.loads(report.read_text())
    assert set(doc) >= {"model", "data", "config", "templates", "results", "versions", "created"}
    assert doc["templates"]["toy"]["text"] == TEMPLATE and doc["versions"]["transformers"]
    first = doc["results"][2]
    assert (first["shots"], first["calibrate"], first["seeds"]) == (2, "off", [0, 1])
    assert set(first["summary"]) == {"accuracy", "macro_f1", "items_per_s"}
    accs = [r["metrics"]["accuracy"] for r in first["runs"]]
    assert first["summary"]["accuracy"]["min"] == min(accs) and first["summary"]["accuracy"]["max"] == max(accs)
    run = first["runs"][0]
    assert set(run["metrics"]) == {"accuracy", "macro_f1", "per_label", "confusion"}
    assert len(run["samples"]) == 5 and run["samples"][0]["id"] == "i0"
    accuracy = sum(s["correct"] for s in run["samples"]) / 5
    assert run["metrics"]["accuracy"] == pytest.approx(accuracy)
    # each row's mean over seeds minus the first combination's, paired by row; tests named; Holm >= raw
    right = lambda r: [sum(run["samples"][i]["correct"] for run in r["runs"]) / len(r["runs"])  # noqa: E731
                       for i in range(5)]
    assert [e["row"] for e in doc["paired"]] == [1, 2, 3] and {e["baseline"] for e in doc["paired"]} == {0}
    for e in doc["paired"]:
        diff = sum(right(doc["results"][e["row"]])) / 5 - sum(right(doc["results"][0])) / 5
        assert e["difference"] == pytest.approx(diff) and e["low"] <= e["difference"] <= e["high"]
        assert e["p_holm"] >= e["p"] and e["test"] == ("mcnemar" if e["row"] == 1 else "permutation")
        assert "item_scores" not in doc["results"][e["row"]]["runs"][0]
    line = lines[12]
    assert f"{doc['paired'][1]['difference'] * 100:+.1f}" in line and f"{doc['paired'][1]['p_holm']:.3g}" in line


def test_eval_table_fits_120_columns_and_detail_keeps_every_number(tiny_models, data, tmp_path, monkeypatch):
    """Piped and on a 120-column terminal every line fits; --detail adds each combination's range,
    precision/recall and confusion (both seeds summed: 10 predictions over 5 items) under the table."""
    from llmlab.core import console

    tmpl = tmp_path / "a-rather-long-template-name.yaml"
    tmpl.write_text(TEMPLATE)
    long_data = tmp_path / "sst2.validation.sample.jsonl"
    long_data.write_text(data.read_text())
    args = ["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", long_data, "--shots", "0,2", "--seeds", 2,
            "--calibration", "both", "--no-log"]
    piped = invoke(args + ["--detail"])
    assert piped.exit_code == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    detail = lines[lines.index(CAPTION[-1]) + 1:]
    detail = detail[:next(n for n, line in enumerate(detail) if line.startswith("Paired differences"))]
    assert detail[:2] == ["toy on sst2.validation.sample.jsonl: 0 shots, calibration off, 1 seed", detail[1]]
    assert detail[1].startswith("  accuracy ") and "macro-F1 " in detail[1]
    assert len(detail) == 4 * 4  # per combination: what it is, metrics with min–max, P/R, confusion
    assert detail[8] == "toy on sst2.validation.sample.jsonl: 2 shots, calibration off, 2 seeds"
    assert detail[10].startswith("  precision/recall %: pos ") and ", neg " in detail[10]
    confusion = detail[11].split("): ", 1)[1]
    assert detail[11].startswith("  confusion (rows gold, columns pos, neg")
    assert sum(int(n) for n in re.findall(r"\d+", confusion)) == 10
    monkeypatch.setattr(console, "stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "120")
    table = invoke(args)
    assert table.exit_code == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 120
    assert "…" not in table.stdout  # no cell cut short
    assert "sst2.validation.sample.jsonl" in table.stdout.replace("│\n│", "")


def test_eval_generate_template(tiny_models, tmp_path):
    tmpl = tmp_path / "sum.yaml"
    tmpl.write_text("name: sum\ntask: generate\ninput: 'Dialogue: {dialogue}\\nSummary:'\ntarget: summary\n"
                    "references: [summary1, summary2]\ngeneration: {max_new_tokens: 4}\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "dialogue": "hi", "summary1": "they greet", "summary2": "a greeting"}\n'
                    '{"id": "b", "dialogue": "bye", "summary1": "they part", "summary2": "farewell"}\n')
    result = invoke(["eval", "-m", tiny_models["t5"], "-t", tmpl, "--data", data])
    assert result.exit_code == 0, result.stderr
    title, header, row, *caption = result.stdout.splitlines()
    assert caption == CAPTION
    assert header.split() == ["template", "data", "shots", "calibration", "seeds", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                              "exact", "%", "items/s"]
    assert row.split()[:6] == ["sum", "d.jsonl", "0", "off", "1", "2"]
    assert float(row.split()[-1]) > 0  # significant digits: a slow run never shows 0.0


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
def test_eval_bad_data(no_model, tmp_path, rows, error):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    data = tmp_path / "bad.jsonl"
    data.write_text(rows)
    report = tmp_path / "r.json"
    result = invoke(["eval", "-m", "./never-loaded", "-t", tmpl, "--data", data, "--report", report])
    assert result.exit_code == 3
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and not report.exists()


def test_eval_non_utf8(no_model, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "caf\xe9", "label": "pos"}\n')
    result = invoke(["eval", "-m", "./never-loaded", "-t", tmpl, "--data", data])
    assert result.exit_code == 3 and "line 1: not UTF-8 text" in result.stderr


def test_eval_report_folder_is_checked_before_the_run(data, tmp_path):
    tmpl = tmp_path / "toy.yaml"
    tmpl.write_text(TEMPLATE)
    result = invoke(["eval", "-m", "./not-loaded", "-t", tmpl, "--data", data, "--report", tmp_path / "no" / "r.json"])
    assert result.exit_code == 3  # a data error, raised before the (bad) model is even looked at
    assert result.stderr == f"error: --report '{tmp_path / 'no' / 'r.json'}': folder '{tmp_path / 'no'}' does not exist; create it first\n"


def test_eval_report_onto_a_directory_fails_before_the_run(data, toy, tmp_path):
    result = invoke(["eval", "-m", "./not-loaded", "-t", toy, "--data", data, "--report", tmp_path])
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: --report '{tmp_path}' is a directory; give a file name inside it")


def test_two_templates_each_on_its_own_data_one_table(fake_lm, data, toy, tmp_path):
    topic = tmp_path / "topic.yaml"
    topic.write_text("name: topic\ntask: classify\ninput: 'Text: {text}\\nTopic:'\ntarget: label\n"
                     "labels: [World, Sports]\n")
    news = tmp_path / "news.jsonl"
    news.write_text('{"text": "the match", "label": "Sports"}\n{"text": "the summit", "label": "World"}\n'
                    '{"text": "a goal", "label": "Sports"}\n')
    result = invoke(["eval", "-m", "fake", "-t", f"{toy}={data}", "-t", f"{topic}={news}"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fake on data.jsonl (5 items), news.jsonl (3 items)"
    assert [line.split()[:6] for line in lines[2:4]] == [["toy", "data.jsonl", "0", "off", "1", "5"],
                                                          ["topic", "news.jsonl", "0", "off", "1", "3"]]
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"tasks:\n  - {{template: {toy}, data: data.jsonl}}\n  - {{template: {topic}, data: news.jsonl}}\n")
    by_plan = invoke(["eval", "-m", "fake", "--plan", plan, "--report", tmp_path / "r.json"])
    assert by_plan.exit_code == 0, by_plan.stderr
    assert json.loads((tmp_path / "r.json").read_text())["model"] == {
        "name": "fake", "type": None, "encoder_decoder": False, "device": "cpu", "dtype": None, "window": 4096,
        "device_map": None}  # a backend with no transformers model behind it
    assert [line.split()[:6] for line in by_plan.stdout.splitlines()[2:4]] == [line.split()[:6] for line in lines[2:4]]


@pytest.mark.parametrize("args, error", [
    (["-t", "sentiment"], "error: template 'sentiment' has no data: give --data FILE, or -t sentiment=FILE"),
    ([], "error: nothing to evaluate: give -t TEMPLATE --data FILE, -t TEMPLATE=FILE, or --plan FILE"),
    (["-t", "sentiment=nope.jsonl"], "error: input file 'nope.jsonl' not found"),
    (["-t", "TOY=DATA", "--seeds", "0"], "error: invalid --seeds 0: must be >= 1"),
    (["-t", "TOY=DATA", "--calibration", "maybe"], "error: invalid --calibration 'maybe': choose off, contextual, batch, domain, probe (or a comma list of them)"),
    (["-t", "TOY=DATA", "--sample", "0"], "error: invalid --sample 0: must be >= 1"),
    (["-t", "TOY=DATA", "--sample", "6"], "error: --sample 6: DATA has only 5 rows; use a smaller --sample"),
])
def test_eval_mistakes_before_any_model(data, toy, args, error):
    args = [a.replace("DATA", str(data)).replace("TOY", str(toy)) for a in args]
    error = error.replace("DATA", str(data))
    result = invoke(["eval", "-m", "./not-loaded", *args])
    assert result.exit_code in (2, 3) and result.stderr.startswith(error), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sample_is_a_seeded_shuffle_before_offset_and_limit(fake_lm, toy, tmp_path):
    """--sample N keeps the first N rows of random.Random(seed).shuffle of the file's rows (the
    recipe prompts/README.md states for AG News); --limit then takes the first of those."""
    import random

    rows = [{"text": f"review {n}", "label": "pos" if n % 2 else "neg", "id": f"r{n}"} for n in range(20)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = list(rows)
    random.Random(3).shuffle(expected)
    report = tmp_path / "r.json"
    result = invoke(["eval", "-m", "fake", "-t", f"{toy}={data}", "--sample", 8, "--sample-seed", 3, "--limit", 5,
                     "--report", report, "--log-samples"])
    assert result.exit_code == 0, result.stderr
    got = json.loads(report.read_text())
    samples = got["results"][0]["runs"][0]["samples"]
    assert [s["id"] for s in samples] == [r["id"] for r in expected[:5]]
    assert got["config"]["sample"] == 8 and got["config"]["sample_seed"] == 3
