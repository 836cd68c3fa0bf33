"""`llmlab optimize` on FakeLM (and a tiny real model): determinism, the held-out rows untouched
until the end, successive halving keeping a planted best variant, the written template rendering
the winning prompt exactly, and the mistakes refused before any model time."""

import json
from pathlib import Path

import pytest

from helpers import invoke
from llmlab.backends.fake import FakeLM
from llmlab.core.config import ModelConfig, OptimizeConfig, PromptConfig
from llmlab.optimizing import optimize as optimizing
from llmlab.optimizing import search as searching
from llmlab.orchestration.session import Hooks
from llmlab.prompting.prompts import find_template

TEMPLATE = """name: tone
task: classify
instruction: Is the review positive or negative?
input: "Review: {text}\\nSentiment:"
target: label
labels: {positive: Positive, negative: Negative}
examples:
  - {text: a good one, label: positive}
  - {text: a bad one, label: negative}
  - {text: good fun, label: positive}
  - {text: bad acting, label: negative}
shots: 2
"""


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": "positive" if i % 2 else "negative"}
            for i in range(start, start + n)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tone.yaml").write_text(TEMPLATE)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(60)))
    return tmp_path


def planted(request) -> float:
    """Right, and sure of it, only when the labels are written in capitals; else a fixed hash."""
    word = request.continuation.strip()
    if word in ("POSITIVE", "NEGATIVE"):
        line = request.context.rsplit("\n", 2)[-2] if request.context.count("\n") >= 2 else request.context
        right = "POSITIVE" if "good" in line else "NEGATIVE" if "bad" in line else None
        return 0.0 if right is None or word == right else -5.0
    return FakeLM._hash_score(request)


def config(files, budget=400, seed=0, **more) -> OptimizeConfig:
    return OptimizeConfig(ModelConfig(), str(files / "tone.yaml"), str(files / "data.jsonl"), str(files / "opt.yaml"),
                          budget, seed=seed, proposals=0, **more)


def test_the_plan_halves_variants_and_doubles_rows_within_the_budget():
    rungs = searching.plan(8, 100, 200)
    assert [(r.count, r.rows) for r in rungs] == [(8, 12), (4, 24), (2, 48)]
    assert searching.cost(rungs) == 8 * 12 + 4 * 12 + 2 * 24 == 192
    assert searching.plan(8, 100, 7) is None  # not one row per variant
    assert [(r.count, r.rows) for r in searching.plan(4, 10, 1000)] == [(4, 10), (2, 10)]  # rows capped


def test_the_same_seed_gives_the_same_search_and_file(files):
    first = optimizing.optimize(config(files), lm=FakeLM(score=planted))
    text = (files / "opt.yaml").read_text()
    again = optimizing.optimize(config(files), lm=FakeLM(score=planted))
    assert (files / "opt.yaml").read_text() == text
    assert (first.winner, first.spent, first.difference) == (again.winner, again.spent, again.difference)
    assert [s.ranked for s in first.trajectory] == [s.ranked for s in again.trajectory]


def test_halving_keeps_the_planted_best_variant(files):
    result = optimizing.optimize(config(files, budget=300, candidates=16), lm=FakeLM(score=planted))
    assert "labels uppercase" in result.winner
    assert len(result.trajectory) == 4 and result.trajectory[0].rows < result.trajectory[-1].rows
    assert result.spent <= 300
    assert result.difference.b == 1.0 and result.difference.significant
    assert result.difference.verdict() == "significant gain"
    assert "POSITIVE" in (files / "opt.yaml").read_text()


def test_held_out_rows_are_scored_only_at_the_end(files):
    lm, phase = FakeLM(score=planted), {"now": "search"}
    search_requests = []

    def progress(total, description):
        import contextlib

        if description == "held-out":
            phase["now"] = "held-out"
            search_requests.extend(lm.requests)
        return contextlib.nullcontext(type("Bar", (), {"advance": lambda self, n=1: None})())

    result = optimizing.optimize(config(files), Hooks(progress=progress), lm=lm)
    template = find_template(str(files / "tone.yaml"))
    search, held, _ = optimizing.read(config(files), template)
    held_texts = {i.fields["text"] + "\n" for i in held}  # whole: "number 1" is in "number 13"
    assert len(held) == 30 and result.held_rows == 30
    assert search_requests and not any(t in r.context for r in search_requests for t in held_texts)
    later = lm.requests[len(search_requests):]
    assert held_texts <= {t for r in later for t in held_texts if t in r.context}


def test_the_written_template_renders_the_winning_prompt_exactly(files):
    from llmlab.orchestration.session import Session

    lm = FakeLM(score=planted)
    result = optimizing.optimize(config(files), lm=lm)
    written = find_template(str(files / "opt.yaml"))
    _, held, _ = optimizing.read(config(files), written)
    builder = Session(ModelConfig(), lm).builder(written, PromptConfig(), 3, None)
    assert [builder.build(item).text for item in held] == result.prompts
    text = (files / "opt.yaml").read_text()
    assert text.startswith("# Written by llmlab optimize from template 'tone'")
    assert "budget 400 scored items" in text and "held-out 30 rows" in text


def test_a_generate_template_is_compared_by_rouge_with_a_permutation_test(tmp_path):
    (tmp_path / "sum.yaml").write_text('name: sum\ninstruction: Summarize.\ninput: "Text: {text}\\nSummary:"\n'
                                       "target: summary\nexamples:\n  - {text: a b c, summary: a b}\n"
                                       "  - {text: d e f, summary: d e}\n")
    data = [{"text": f"w{i} x{i} y{i}", "summary": f"w{i} x{i}"} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = OptimizeConfig(ModelConfig(), str(tmp_path / "sum.yaml"), str(tmp_path / "d.jsonl"),
                         str(tmp_path / "o.yaml"), 40, proposals=0, candidates=4)
    result = optimizing.optimize(cfg, lm=FakeLM(default="w1 x1"))
    assert result.metric == "ROUGE-L" and result.difference.test == "permutation"
    assert result.held_rows == 8 and result.spent <= 40


@pytest.mark.parametrize("args, error", [
    (["--budget", "0"], "invalid --budget 0: give the scored items the search may spend, e.g. --budget 2000"),
    (["--budget", "20 min"], "invalid --budget '20 min': give scored items (e.g. 2000) or a time (e.g. 20m, 90s, 1h)"),
    (["--probe-rows", "1"], "invalid --probe-rows 1: 0 (none) or at least 2 search rows for a probe"),
    (["--budget", "1"], "--budget 1 is too small: two variants on one row each need 2 scored items; raise --budget"),
    (["--data", "{tmp}/small.jsonl"], "too few rows to split: 1 to search and 2 held out (need at least 4 and 2); "
                                       "give more rows, or --test FILE for the held-out rows"),
    (["-t", "{tmp}/nolabels.yaml"], "{tmp}/nolabels.yaml: a classify template needs 'labels' (at least two)"),
    (["-o", "{tmp}/missing/opt.yaml"], "-o '{tmp}/missing/opt.yaml': folder '{tmp}/missing' does not exist; "
                                        "create it first"),
    (["-o", "{tmp}/opt.txt"], "-o '{tmp}/opt.txt': the optimised template is written as YAML; name a .yaml file"),
    (["--holdout", "1"], "invalid --holdout 1.0: the held-out share of --data, between 0 and 1"),
    (["--test", "{tmp}/data.jsonl"], "--test is the --data file itself: held-out rows must not be searched on; "
                                      "give another file, or leave --test out to hold out part of --data"),
])
def test_mistakes_fail_in_one_line_before_model_time(files, no_model, args, error):
    (files / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(3)))
    (files / "nolabels.yaml").write_text("task: classify\ninput: '{text}'\ntarget: label\n")
    base = {"-t": str(files / "tone.yaml"), "--data": str(files / "data.jsonl"), "--budget": "400",
            "-o": str(files / "opt.yaml")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value.format(tmp=files)
    result = invoke(["optimize", *[x for kv in base.items() for x in kv], "--proposals", "0"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [f"error: {error.format(tmp=files)}"]


def test_the_command_prints_the_held_out_table(files, fake_lm):
    fake_lm.score = planted
    result = invoke(["optimize", "-t", files / "tone.yaml", "--data", files / "data.jsonl", "--budget", "300",
                     "-o", files / "opt.yaml", "--proposals", "0", "--no-log"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "30 held-out rows, scored once"
    assert lines[-1].startswith("difference +") and lines[-1].endswith(": significant gain")
    assert "McNemar exact p = " in lines[-1] and "95% paired bootstrap CI [+" in lines[-1]
    assert Path(files / "opt.yaml").is_file()


@pytest.mark.slow
def test_a_tiny_real_model_optimises_end_to_end(files, tiny_models):
    result = invoke(["optimize", "-t", files / "tone.yaml", "--data", files / "data.jsonl", "--budget", "120",
                     "--candidates", "4", "--proposals", "1", "-o", files / "opt.yaml", "-m", tiny_models["llama"],
                     "--no-log"])
    assert result.exit_code == 0, result.stderr
    assert "held-out accuracy" in result.stdout and "paired bootstrap CI" in result.stdout
    assert (files / "opt.yaml").read_text().startswith("# Written by llmlab optimize")


def test_the_trajectory_and_the_comparison_go_to_the_run_log(files, fake_lm):
    from llmlab.runs import runlog

    fake_lm.score = planted
    result = invoke(["optimize", "-t", files / "tone.yaml", "--data", files / "data.jsonl", "--budget", "300",
                     "-o", files / "opt.yaml", "--proposals", "0"])
    assert result.exit_code == 0, result.stderr
    db = runlog.connect()
    run_id = db.execute("SELECT max(id) FROM runs").fetchone()[0]
    run = runlog.get_run(db, run_id)
    assert run["status"] == "complete" and run["command"] == "optimize"
    m = run["metrics"]
    assert (m["metric"], m["held_rows"], m["candidates"], m["test"]) == ("accuracy", 30, 16, "mcnemar")
    assert [len(step["ranked"]) for step in m["trajectory"]] == [16, 8, 4, 2]
    assert m["spent"] <= 300 and "labels uppercase" in m["winner"]
    assert m["difference"] == pytest.approx(m["optimised"] - m["start"])


def test_a_tight_budget_drops_variants_that_need_their_own_probe_first(files):
    from llmlab.optimizing import space as spaces
    from llmlab.prompting.prompts import load_template

    template = load_template(str(Path(__file__).resolve().parent.parent / "prompts" / "sentiment.yaml"))
    space = spaces.make_space(template, template.examples)
    cfg = config(files, budget=120 + 6 * 10 + 3 * 10 + 2 * 20, candidates=8, seed=1)
    drawn = spaces.candidates(space, 8, 1)
    assert sum(v.readout == "probe" for v in drawn) >= 2  # the start template's own probe, and another
    variants, rungs = optimizing.schedule(space, cfg, 200, 120)
    kept = [v for v in drawn if v.start or v.readout != "probe"]
    assert variants[0].start and not any(v.readout == "probe" for v in variants[1:])
    assert [v for v in variants if v in drawn] == kept and len(variants) > len(kept)  # stand-ins came in
    assert searching.cost(rungs, 120) <= cfg.budget and rungs[0].count == len(variants)
    plenty = config(files, budget=100_000, candidates=8, seed=1)
    assert optimizing.schedule(space, plenty, 200, 120)[0] == drawn  # nothing dropped when all fit


def test_a_probe_fitted_on_search_rows_set_aside_wins_when_only_the_states_know_the_label(files):
    """Label scores are a hash (chance); the hidden states carry the label: the "probe data" readout
    wins, its rows are written beside the template, and they are never searched or held out."""
    from llmlab.prompting.prompts import load_template

    lm = FakeLM(score=FakeLM._hash_score)
    result = optimizing.optimize(config(files, budget=600, candidates=8, probe_rows=10), lm=lm)
    assert "readout probe data" in result.winner and result.difference.b == 1.0
    written = load_template(str(files / "opt.yaml"))
    assert written.calibrate == "probe" and written.probe_path == files / "opt.probe.npz"  # the fitted probe
    assert "Its probe: opt.probe.npz, fitted on 10 search rows (opt.probe.jsonl) for fake;" in written.source_text
    probe_rows = [json.loads(line)["text"] for line in (files / "opt.probe.jsonl").read_text().splitlines()]
    assert len(probe_rows) == 10  # its rows, to refit one for another model
    searched = {line.rsplit("Review: ", 1)[-1].split("\n")[0] for line in result.prompts}
    assert not searched & set(probe_rows)  # no held-out row among the probe's


def test_the_written_fitted_probe_answers_as_in_the_search_without_a_refit(files, fake_lm):
    """eval of the written template reads its probe as fitted: the held-out result comes back exactly,
    and no probe row is scored again."""
    fake_lm.score = FakeLM._hash_score
    result = optimizing.optimize(config(files, budget=600, candidates=8, probe_rows=10, holdout=0.5), lm=fake_lm)
    held = files / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows(6, start=100)))
    before = len(fake_lm.requests)
    out = invoke(["eval", "-t", files / "opt.yaml", "--data", held, "-v"])
    assert out.exit_code == 0, out.stderr
    line = out.stdout.splitlines()[2].split()
    assert "probe" in line and line[-5:-1] == ["1", "6", "100.0", "100.0"]  # calibration; seeds, n, accuracy, F1
    assert "fitting the probe" not in out.stderr and "read from " + str(files / "opt.probe.npz") in out.stderr
    assert len(fake_lm.requests) - before == 6 * 2 and result.difference.b == 1.0


@pytest.mark.parametrize("more, error", [
    ({"probe_rows": 1}, "invalid --probe-rows 1"),
    ({"probe_rows": 40}, "--probe-rows 40: the search has 30 rows"),
])
def test_bad_probe_rows_are_refused_before_model_time(files, more, error):
    lm = FakeLM()
    with pytest.raises(Exception, match=error):
        optimizing.optimize(config(files, **more), lm=lm)
    assert lm.requests == []


class Clock:
    """A fake clock: each label scored costs `cost` seconds (none is slept); `slower` multiplies the
    cost once `after` seconds have passed (a machine that gets busy)."""

    def __init__(self, cost=0.05, slower=1.0, after=float("inf")):
        self.now, self.cost, self.slower, self.after = 0.0, cost, slower, after

    def __call__(self):
        return self.now

    def score(self, request):
        self.now += self.cost * (self.slower if self.now >= self.after else 1.0)
        return planted(request)


def test_a_time_budget_buys_the_items_a_pilot_times_in_the_same_order(files):
    runs = []
    for _ in range(2):
        clock = Clock()
        result = optimizing.optimize(config(files, budget=0, budget_seconds=30.0), lm=FakeLM(score=clock.score),
                                     clock=clock)
        runs.append((result.budget, result.spent, result.winner, [s.ranked for s in result.trajectory]))
        assert result.search_seconds <= 30.0 + 1e-9 and result.budget_seconds == 30.0
    assert runs[0] == runs[1]  # deterministic for a seed and a clock
    # the pilot: 0.1 s an item (two labels), so 30 s buy 300; calibrated variants cost more (their
    # content-free prompts), so the rounds that would end after 30 s are left out
    assert runs[0][0] == 300 and runs[0][1] <= 300 and runs[0][3]


def test_when_the_machine_slows_down_the_rounds_after_the_deadline_are_not_run(files):
    clock = Clock(slower=4.0, after=5.0)
    result = optimizing.optimize(config(files, budget=0, budget_seconds=30.0), lm=FakeLM(score=clock.score),
                                 clock=clock)
    assert result.budget == 300  # the pilot ran at full speed
    # four rounds planned (16 variants); the first always runs whole (here past the time), no other one
    assert len(result.trajectory) == 1 and result.search_seconds > 30.0
    assert result.winner_search[0] == result.trajectory[-1].ranked[0][1]  # the last round's best won


@pytest.mark.parametrize("text, expected", [
    ("2000", (2000, 0.0)), ("20m", (0, 1200.0)), ("90s", (0, 90.0)), ("1.5h", (0, 5400.0)), (" 7 ", (7, 0.0)),
    ("0m", "invalid --budget '0m': the search needs some time, e.g. 20m"),
    ("20 minutes", "invalid --budget '20 minutes': give scored items (e.g. 2000) or a time (e.g. 20m, 90s, 1h)"),
    ("-5", "invalid --budget '-5'"),
])
def test_budget_is_items_or_a_time(text, expected):
    from llmlab.core.errors import UsageError
    from llmlab.optimizing import budget

    if isinstance(expected, tuple):
        assert budget.parse(text) == expected
    else:
        with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            budget.parse(text)


def test_a_proposer_model_writes_the_instructions_and_the_searched_model_writes_none(files):
    from llmlab.backends.models import GenRequest

    searched, writer = FakeLM(score=planted), FakeLM(answers=["Answer POSITIVE or NEGATIVE.", "Say the tone."],
                                                     name="writer")
    import dataclasses

    cfg = dataclasses.replace(config(files), proposals=2, proposer=ModelConfig("writer"))
    result = optimizing.optimize(cfg, lm=searched, proposer_lm=writer)
    assert result.proposals == ["Answer POSITIVE or NEGATIVE.", "Say the tone."]
    asked = [r for r in writer.requests if isinstance(r, GenRequest)]
    assert len(asked) == 2 and "Write one short sentence" in asked[0].prompt and "Review: " in asked[0].prompt
    assert not any(isinstance(r, GenRequest) for r in searched.requests)  # the searched model only scores
    assert "# Instructions proposed by writer." in (files / "opt.yaml").read_text()


def test_a_proposer_without_proposals_is_refused_before_model_time(files):
    from llmlab.core.errors import UsageError

    lm = FakeLM()
    with pytest.raises(UsageError, match="--proposer writes the --proposals instructions, and --proposals is 0"):
        optimizing.optimize(config(files, proposer=ModelConfig("writer")), lm=lm, proposer_lm=FakeLM())
    assert lm.requests == []


@pytest.mark.slow
def test_a_tiny_real_proposer_model_loads_through_the_registry(files, tiny_models):
    result = invoke(["optimize", "-t", files / "tone.yaml", "--data", files / "data.jsonl", "--budget", "60",
                     "--candidates", "2", "--proposals", "1", "--proposer", tiny_models["llama-chat"], "-o", files / "opt.yaml",
                     "-m", tiny_models["llama"], "--no-log", "-v"])
    assert result.exit_code == 0, result.stderr
    assert "proposer: " in result.stderr and "tiny-llama-chat" in result.stderr


def test_the_start_template_written_elsewhere_keeps_its_examples_and_probe(tmp_path):
    """When the start template wins, the file written far from prompts/ still loads as it: its examples
    file written in, its probe file copied beside it."""
    from llmlab.optimizing import writer
    from llmlab.prompting.prompts import load_template

    start = load_template(str(Path(__file__).resolve().parent.parent / "prompts" / "sentiment.yaml"))
    loaded = writer.write(writer.beside(start, str(tmp_path / "opt.yaml")), str(tmp_path / "opt.yaml"), ["lineage"])
    assert loaded.examples == start.examples and loaded.examples_path is None
    assert loaded.probe_path == tmp_path / "opt.probe.jsonl"
    assert (tmp_path / "opt.probe.jsonl").read_text() == start.probe_path.read_text()


def test_the_written_files_have_ordinary_permissions(tmp_path):
    """The template and its probe rows are files for the user and their team: 0666 less the umask, as any
    file the user writes, not a temporary file's private 0600."""
    import os
    import stat

    from llmlab.io.items import Item
    from llmlab.optimizing import writer
    from llmlab.prompting.prompts import load_template

    mask = os.umask(0o022)
    try:
        start = load_template(str(Path(__file__).resolve().parent.parent / "prompts" / "sentiment.yaml"))
        writer.write(writer.beside(start, str(tmp_path / "opt.yaml")), str(tmp_path / "opt.yaml"), ["lineage"])
        writer.write_rows([Item(0, {"text": "good", "label": "positive"}, "line 1")], tmp_path / "rows.jsonl")
    finally:
        os.umask(mask)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("opt.yaml", "rows.jsonl")] == [0o644, 0o644]
    assert (tmp_path / "rows.jsonl").read_text() == '{"text": "good", "label": "positive"}\n'
