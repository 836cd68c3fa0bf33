"""`--server URL` / LLMLAB_SERVER: generate and classify done by a running server write what the
in-process run writes (stdout, files, --resume, the run log), and the client imports neither torch nor
transformers. FakeLM on both sides for the fast tests; a tiny real model for the slow one."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from helpers import invoke, jsonl  # noqa: E402
from llmlab.backends.fake import FakeLM  # noqa: E402
from llmlab.runs import runlog  # noqa: E402
from test_serve import running  # noqa: E402

REVIEWS = [{"id": f"r{n}", "text": t, "label": g} for n, (t, g) in enumerate(
    [("a good film", "positive"), ("dull and bad", "negative"), ("fine", "positive"), ("awful", "negative")])]


@pytest.fixture(scope="module")
def url():
    with running(FakeLM(default="hello world")) as (address, _):
        yield address


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{n}", "prompt": f"the movie was {n}"}) + "\n" for n in range(5)))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    return prompts, reviews


def both(args, url, tmp_path, out=None):
    """(in-process result, --server result), with -o files given as OUT (one per run)."""
    results = []
    for n, extra in enumerate(([], ["--server", url])):
        target = tmp_path / f"out{n}.{out}" if out else None
        run = invoke([a if a != "OUT" else target for a in args] + extra)
        assert run.exit_code == 0, run.stderr
        results.append((run, target.read_text() if target else None))
    return results


CASES = [  # the same command with and without --server
    (["generate", "hi there", "--max-new-tokens", "4"], None),
    (["generate", "hi there", "--max-new-tokens", "8", "--stop", "o w", "--echo"], None),
    (["generate", "-i", "PROMPTS", "-o", "OUT", "--max-new-tokens", "3", "--batch-size", "2"], "jsonl"),
    (["generate", "-i", "PROMPTS", "--offset", "1", "--limit", "3", "-o", "OUT", "--logprobs"], "csv"),
    (["generate", "-t", "qa", "Where is Ganymede?", "--shots", "1"], None),
    (["classify", "-t", "sentiment", "-i", "REVIEWS", "--shots", "2", "--calibration", "contextual", "-f", "jsonl"],
     None),
    (["classify", "-t", "sentiment", "-i", "REVIEWS", "--shots", "0", "--calibration", "batch", "-o", "OUT"], "csv"),
]


@pytest.mark.parametrize("args, out", CASES)
def test_server_output_equals_in_process_output(fake_lm, url, files, tmp_path, args, out):
    fake_lm.default = "hello world"
    args = [files[0] if a == "PROMPTS" else files[1] if a == "REVIEWS" else a for a in args]
    (local, local_file), (remote, remote_file) = both(args, url, tmp_path, out)
    assert remote.stdout == local.stdout
    assert remote_file == local_file
    runs = jsonl(invoke(["runs", "list", "--json"]).stdout)
    assert [r["items"] for r in runs] == [runs[0]["items"]] * 2 and runs[0]["status"] == "complete"
    logged = [sorted((i["idx"], i["key"], i["prompt"], i["output"]) for i in runlog.items(runlog.connect(), r["id"]))
              for r in runs]
    assert logged[0] == logged[1]


SPEED = ("seconds", "items_per_s", "created")  # wall-clock facts: the only things allowed to differ


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in SPEED}
    return [_timeless(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("extra", [
    ["--shots", "0,2", "--seeds", "2", "--calibration", "off,contextual", "--log-samples", "--detail"],
    ["--shots", "1", "--calibration", "batch", "--offset", "1", "--limit", "3"],
])
def test_eval_through_the_server_gives_the_same_table_report_and_run_log(fake_lm, url, files, tmp_path, extra):
    results = []
    for n, server in enumerate(([], ["--server", url])):
        report = tmp_path / f"report{n}.json"
        run = invoke(["eval", "-t", "sentiment", "--data", files[1], "--report", report, *extra, *server])
        assert run.exit_code == 0, run.stderr
        results.append((run.stdout, json.loads(report.read_text())))
    (local, local_report), (remote, remote_report) = results
    assert _timeless(remote_report) == _timeless(local_report)
    speed = re.compile(r"\s+[\d.]+$")  # each row's last column: items/s
    assert [speed.sub("", x) for x in remote.splitlines()] == [speed.sub("", x) for x in local.splitlines()]
    runs = jsonl(invoke(["runs", "list", "--json"]).stdout)
    assert [r["command"] for r in runs] == ["eval", "eval"] and {r["status"] for r in runs} == {"complete"}
    logged = [sorted(tuple(i[k] for k in ("idx", "key", "prompt", "output", "prediction", "combo", "template"))
                     for i in runlog.items(runlog.connect(), r["id"])) for r in runs]
    assert logged[0] == logged[1] and logged[0]
    combos = [[(x["template"], x["shots"], x["seed"], x["calibrate"], x["metrics"]) for x in
               runlog.get_run(runlog.connect(), r["id"])["metrics"]["results"]] for r in runs]
    assert combos[0] == combos[1] and combos[0]


def test_resume_through_the_server(fake_lm, url, files, tmp_path):
    fake_lm.default = "hello world"
    out = tmp_path / "out.jsonl"
    full = invoke(["generate", "-i", files[0], "-o", out, "--max-new-tokens", "3"])
    assert full.exit_code == 0
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))
    again = invoke(["generate", "-i", files[0], "-o", out, "--max-new-tokens", "3", "--resume", "--server", url])
    assert again.exit_code == 0, again.stderr
    assert out.read_text() == whole


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--server", "http://127.0.0.1:9"],
     "no llmlab server answers at http://127.0.0.1:9 ([Errno 111] Connection refused): start one with `llmlab "
     "serve`, or drop --server / LLMLAB_SERVER"),
    (["generate", "hi", "--examples", "pool.jsonl", "-t", "qa", "--server", "URL"],
     "--server: --examples names files here, which the server can't read; drop --examples or --server"),
    (["generate", "hi", "--max-new-tokens", "5000", "--server", "URL"],
     "the server at URL: max_new_tokens 5000 is over this server's cap of 1024"),
    (["generate", "x" * 3500, "--max-new-tokens", "1000", "--server", "URL"],
     "the server at URL: input 1: the prompt has 3500 tokens + 1000 new tokens, over the model's 4096-token window"),
    (["classify", "-t", "no-such", "x", "--server", "URL"],
     "no template named 'no-such'"),
    (["classify", "-t", "sentiment", "x", "--calibration", "off", "--probe-layers", "1", "--server", "URL"],
     "the server at URL: --probe-layers is read only with --calibration probe"),
    (["eval", "-t", "sentiment", "--data", "d.jsonl", "--processes", "2", "--server", "URL"],
     "--server: --processes can't go to the server (it names files or processes here); drop --processes or "
     "--server"),
    (["eval", "-t", "sentiment", "--data", "d.jsonl", "--adapter", "a", "--server", "URL"],
     "--server: --adapter can't go to the server"),
    (["eval", "-t", "my/own.yaml", "--data", "d.jsonl", "--server", "URL"],
     "--server: the server finds templates by name; 'my/own.yaml' is a file here (drop --server to use it)"),
    (["next", "hi", "--temperature", "-1", "--server", "URL"], "invalid --temperature -1.0: must be 0 (greedy) or >= 0.01"),
    (["next", "hi", "-m", "gpt2", "--server", "URL"],
     "the server at URL: the model 'gpt2' is not served here; this server serves 'fake'"),
])
def test_server_mistakes_are_one_line(url, args, message):
    result = invoke([a.replace("URL", url) for a in args])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: " + message.replace("URL", url)) and result.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("args", [["generate", "hi"], ["classify", "-t", "sentiment", "a good film"],
                                  ["eval", "-t", "sentiment", "--data", "REVIEWS", "--shots", "0,1"]])
def test_the_client_imports_neither_torch_nor_transformers(url, files, args):
    argv = [str(files[1]) if a == "REVIEWS" else a for a in args] + ["--server", url, "-q"]
    code = (f"import sys\nfrom llmlab.commands import cli\nsys.argv = ['llmlab', *{argv!r}]\ntry:\n    cli.main()\n"
            "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'fastapi', 'uvicorn', 'pydantic'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", result.stderr
    assert args[0] != "generate" or result.stdout.splitlines() == ["hello world", "[]"]


@pytest.mark.slow
def test_server_equals_in_process_on_a_real_model(tiny_models, files, tmp_path):
    from llmlab.backends import models

    model = str(tiny_models["llama"])
    with running(models.load(model, "cpu", "float32")) as (address, _):
        for args, out in [(["generate", "-i", files[0], "-o", "OUT", "--max-new-tokens", "5", "--logprobs"], "jsonl"),
                          (["classify", "-t", "sentiment", "-i", files[1], "--shots", "2", "-o", "OUT"], "jsonl"),
                          (["next", "the sky is", "--steps", "3", "--show", "4", "--top-k", "3", "--seed", "2",
                            "-f", "jsonl"], None),
                          (["next", "the sky is", "--top-p", "0.9", "--temperature", "0.7", "--seed", "1", "-f", "text"], None)]:
            (local, local_file), (remote, remote_file) = both(args + ["-m", model], address, tmp_path, out)
            assert remote.stdout == local.stdout
            if out is None:  # next: one forward pass per step on either side, the same numbers
                assert local.stdout.count("\n") >= 3
                continue
            local_rows, remote_rows = jsonl(local_file), jsonl(remote_file)
            for a, b in zip(local_rows, remote_rows):  # scores may differ in the last float bits (batching)
                for key in ("probabilities", "raw_probabilities"):
                    assert b.pop(key, None) == pytest.approx(a.pop(key, None), abs=1e-5)
                assert [t.pop("logprob") for t in b.get("logprobs", [])] == pytest.approx(
                    [t.pop("logprob") for t in a.get("logprobs", [])], abs=1e-5)
            assert remote_rows == local_rows
