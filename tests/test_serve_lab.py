"""`llmlab lab --server URL`: the same script gives the same stdout and stderr in-process and through a
real server (the served tokenizer over HTTP, completions and /next there), and the client imports
neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from helpers import TEST_DEVICE, invoke  # noqa: E402
from test_serve import running  # noqa: E402

SCRIPT = "\n".join([
    "/set max_new_tokens 4",
    "the movie was",
    "/show",
    "/tokens",
    "/next",
    "/template sentiment",
    "/shots 1",
    "great",
    "/show",
    "/tokens",
    "/next a dull film",
    "/set top_logprobs 2",
    "/template off",
    "the movie was",
    "/set top_logprobs 0",
    "/set logprobs off",
    "/set sample on",
    "/set seed 3",
    "/set temperature 0.8",
    "hello there",
    "/chat off",
    "hello there",
    "/next",
    "/set stop \"e\"",
    "/set sample off",
    "/set max_new_tokens 8",
    "hello there",
    "/quit",
]) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "llama-chat", "t5"])
def test_lab_through_a_server_prints_what_it_prints_in_process(tiny_models, kind):
    from llmlab.backends import models

    model = str(tiny_models[kind])
    local = invoke(["lab", "-m", model], input=SCRIPT)
    assert local.exit_code == 0, local.stderr
    with running(models.load(model, TEST_DEVICE, "float32")) as (address, _):
        remote = invoke(["lab", "-m", model, "--server", address], input=SCRIPT)
    assert remote.exit_code == 0, remote.stderr
    assert "step 1: next token after" in local.stdout and "token budget (1 shot)" in local.stdout
    assert local.stdout.count("\n") > 40
    assert remote.stdout == local.stdout
    assert remote.stderr == local.stderr


@pytest.mark.slow
def test_lab_client_imports_neither_torch_nor_transformers(tiny_models):
    from llmlab.backends import models

    model = str(tiny_models["llama"])
    code = (f"import sys\nfrom llmlab.commands import cli\nsys.argv = ['llmlab', 'lab', '-m', {model!r}, '--server', "
            "sys.argv[1]]\ntry:\n    cli.main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'fastapi', 'uvicorn'}))")
    with running(models.load(model, TEST_DEVICE, "float32")) as (address, _):
        result = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                                input="/set max_new_tokens 2\nthe movie\n/tokens\n/next\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]" and "step 1: next token after" in result.stdout


@pytest.mark.parametrize("args, error", [
    ([], "error: no llmlab server answers at http://127.0.0.1:9"),
    (["--shots", "-1"], "error: invalid --shots -1: must be >= 0"),  # the options first, as in-process
    (["-t", "nosuch"], "error: no template named 'nosuch'"),
])
def test_lab_server_mistakes_are_one_line(args, error):
    result = invoke(["lab", "--server", "http://127.0.0.1:9", *args], input="hi\n")
    assert result.exit_code != 0 and result.stdout == ""
    assert result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr
