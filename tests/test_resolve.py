"""One rule for a run's settings: a template's own `shots:` and `calibrate:` apply unless a flag says
otherwise, the same in classify, eval and compare (orchestration.resolve)."""

import json

import pytest

from helpers import invoke, jsonl
from test_classify import ITEMS, TEMPLATE

from llmlab.core.errors import UsageError
from llmlab.orchestration import resolve

DEFAULTS = TEMPLATE + "shots: 2\ncalibrate: contextual\n"


@pytest.fixture
def files(tmp_path):
    tmpl, data = tmp_path / "toy.yaml", tmp_path / "data.jsonl"
    tmpl.write_text(DEFAULTS)
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return tmpl, data


@pytest.mark.slow
def test_classify_and_eval_with_no_flags_give_the_same_predictions(tiny_models, files, tmp_path):
    tmpl, data = files
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    classified = invoke(["classify", "-m", tiny_models["llama"], "-t", tmpl, "-i", data, "-o", out])
    assert classified.exit_code == 0, classified.stderr
    evaluated = invoke(["eval", "-m", tiny_models["llama"], "-t", tmpl, "--data", data, "--report", report,
                        "--log-samples"])
    assert evaluated.exit_code == 0, evaluated.stderr
    # The table says where each setting came from.
    row = evaluated.stdout.splitlines()[2].split()
    assert row[:7] == ["toy", "data.jsonl", "2", "(template)", "contextual", "(template)", "1"]
    result = json.loads(report.read_text())["results"][0]
    assert (result["shots"], result["calibrate"], result["sources"]) == (
        2, "contextual", {"shots": "template", "calibrate": "template"})
    samples = result["runs"][0]["samples"]
    records = jsonl(out.read_text())
    assert [r["shots"] for r in records] == [s["shots"] for s in samples] and records[0]["shots"]
    assert [(r["prediction"], r["probabilities"]) for r in records] == \
        [(s["prediction"], s["probabilities"]) for s in samples]


class Template:
    def __init__(self, task="classify", shots=None, calibrate=None):
        self.task, self.shots, self.calibrate = task, shots, calibrate


@pytest.mark.parametrize("flag, template, method, probe_data, expected", [
    (None, Template(), "score", None, ("off", "default")),
    (None, Template(calibrate="probe"), "score", None, ("probe", "template")),
    ("off", Template(calibrate="probe"), "score", None, ("off", "flag")),
    (None, Template(calibrate="contextual"), "score", "rows.jsonl", ("probe", "flag")),  # --probe-data means probe
    (None, Template(calibrate="contextual"), "generate", None, ("off", "default")),  # only scores are calibrated
    ("batch", Template(task="generate"), "score", None, ("off", "default")),  # generate templates: never
])
def test_calibration_rule(flag, template, method, probe_data, expected):
    found = resolve.calibration(flag, template, method, probe_data)
    assert (found.value, found.source) == expected


@pytest.mark.parametrize("call, error", [
    (lambda: resolve.calibration("bogus", Template()), "invalid --calibration 'bogus'"),
    (lambda: resolve.calibration("contextual", Template(), "generate"), "--calibration needs --method score"),
    (lambda: resolve.calibration("off,contextual", Template()), "one method here"),
    (lambda: resolve.calibration_flag("batch", True), "--calibrate means --calibration contextual"),
    (lambda: resolve.shots(-1, Template()), "invalid --shots -1"),
    (lambda: resolve.shot_counts("1,x", Template()), "invalid --shots '1,x'"),
])
def test_resolution_mistakes(call, error):
    with pytest.raises(UsageError, match=error.replace("(", r"\(").replace("-", r"\-")):
        call()


def test_shots_rule_and_labels():
    assert resolve.shots(None, Template(shots=4)).label() == "4 (template)"
    assert resolve.shots(1, Template(shots=4)).label() == "1"
    assert resolve.shots(None, Template()).label() == "0 (default)"
    assert [s.value for s in resolve.shot_counts("0,4,4", Template(shots=2))] == [0, 4]
    assert resolve.calibration_flag(None, True) == "contextual"
    assert resolve.calibrations("both", Template()) == [resolve.Sourced("off", "flag"),
                                                        resolve.Sourced("contextual", "flag")]
