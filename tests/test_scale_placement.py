"""--device-map / --max-memory / --dry-run: a tiny model forced to split between the CPU and disk
(accelerate offload) scores and generates exactly like the same model in one piece."""

from __future__ import annotations

import pytest

from helpers import invoke
from llmlab.backends import placement
from llmlab.backends.base import GenRequest, LLRequest
from llmlab.core.errors import UsageError
from llmlab.orchestration.session import settings_for

# Room on the CPU for the tiny Llama's embedding (tied with the head) but not its layers, which
# then go to disk: the model runs split over two places.
SPLIT = "cpu=100KiB"
PREFIX = "Review: a charming story. Sentiment: positive\nReview: the film was terrible. Sentiment:"


@pytest.fixture(scope="module")
def whole_and_split(tiny_models):
    from llmlab.backends import models

    folder = str(tiny_models["llama"])
    whole = models.load(folder, "cpu", "float32")
    split = models.load(folder, "auto", "float32", device_map="auto", max_memory=placement.parse_max_memory(SPLIT))
    return whole, split


def test_the_split_model_really_is_split(whole_and_split):
    _, split = whole_and_split
    assert split.model.hf_device_map == {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.norm": "disk",
                                         "model.rotary_emb": "disk", "model.layers": "disk"}
    assert split.device == "cpu"  # inputs go to the embedding's device
    assert str(split.model.model.layers[0].self_attn.q_proj.weight.device) == "meta"  # weights stay on disk


def test_split_scores_are_identical(whole_and_split):
    whole, split = whole_and_split
    requests = [LLRequest(PREFIX + " " + text, label, prefix=PREFIX)
                for text in ("the movie was great and I loved it", "dull and boring")
                for label in (" positive", " negative")] + [LLRequest("hello", " there")]
    for cache in (True, False):  # with and without the prefix KV cache
        want = whole.loglikelihood(requests, prefix_cache=cache)
        got = split.loglikelihood(requests, prefix_cache=cache)
        assert [(o.logprob, o.tokens, o.greedy) for o in got] == [(o.logprob, o.tokens, o.greedy) for o in want]


def test_split_greedy_generations_are_identical(whole_and_split):
    whole, split = whole_and_split
    settings = settings_for(None, None, {"max_new_tokens": 8})
    reqs = [GenRequest("the movie was"), GenRequest("Ganymede is a moon of"), GenRequest("Summarize the following")]
    want = whole.generate(reqs, settings, batch_size=2)
    got = split.generate(reqs, settings, batch_size=2)
    assert [(o.completions, o.completion_tokens) for o in got] == [(o.completions, o.completion_tokens) for o in want]


def test_dry_run_shows_the_placement_without_loading(tiny_models):
    result = invoke(["classify", "-t", "sentiment", "--model", tiny_models["llama"], "--dtype", "float32",
                     "--device-map", "auto", "--max-memory", SPLIT, "--dry-run", "x"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{tiny_models['llama']}: placement by accelerate (122.66 KiB of weights)",
        "  cpu        50.00 KiB  (limit 100.00 KiB)  2 module(s): model.embed_tokens, lm_head",
        "  disk       72.66 KiB  (limit -)  3 module(s): model.norm, model.rotary_emb, model.layers",
    ]


def test_dry_run_matches_what_loading_does(tiny_models, whole_and_split):
    from llmlab.backends import loading

    _, split = whole_and_split
    lines = loading.placement_plan(str(tiny_models["llama"]), "float32", "auto", placement.parse_max_memory(SPLIT))
    placed = {d: [m for m, w in split.model.hf_device_map.items() if w == d] for d in ("cpu", "disk")}
    assert ", ".join(placed["cpu"]) in lines[1] and ", ".join(placed["disk"]) in lines[2]


@pytest.mark.parametrize("text, expected", [
    ("0=20GiB,cpu=64GiB", {0: 20 * 2**30, "cpu": 64 * 2**30}),
    ("cpu=500MB", {"cpu": 500 * 10**6}),
    ("1=1.5GiB, mps=2GB", {1: int(1.5 * 2**30), "mps": 2 * 10**9}),
    ("cpu=4096", {"cpu": 4096}),
])
def test_max_memory_parsing(text, expected):
    assert placement.parse_max_memory(text) == expected


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "cpu=1GiB"], "error: --max-memory needs --device-map (e.g. --device-map auto "
                                   "--max-memory 0=20GiB,cpu=64GiB)"),
    (["--device-map", "auto", "--max-memory", "cpu:1GiB"],
     "error: invalid --max-memory 'cpu:1GiB': give DEVICE=SIZE pairs like 0=20GiB,cpu=64GiB (DEVICE: a GPU "
     "index, cpu or mps)"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"],
     "error: invalid --max-memory size 'lots' for cpu: give a size like 20GiB, 512MiB or 8GB"),
    (["--device-map", "everywhere"],
     "error: invalid --device-map 'everywhere': choose auto, balanced, balanced_low_0, sequential"),
    (["--device-map", "auto", "--device", "cpu"],
     "error: --device cpu and --device-map auto both place the model; give only one"),
    (["--device-map", "auto", "--max-memory", "3=1GiB"],
     "error: --max-memory names GPU 3, but 0 CUDA device(s) are visible"),
    (["--tensor-parallel-size", "2"],
     "error: --tensor-parallel-size needs --backend vllm; with hf use --device-map auto"),
])
def test_placement_mistakes_are_one_line_before_any_model_time(args, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("llmlab.backends.models.load", lambda *a, **k: pytest.fail("no model may load"))
    result = invoke(["generate", "hi", "--model", "nowhere", *args])
    assert (result.exit_code, result.stderr.strip()) == (2, message)


def test_parse_errors_are_usage_errors():
    with pytest.raises(UsageError):
        placement.parse_max_memory(",")


def test_eval_with_a_device_map_reports_it_and_scores_the_same(tiny_models, tmp_path):
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data" / "obvious_reviews.jsonl"
    reports = []
    for extra in ([], ["--device-map", "auto", "--max-memory", SPLIT]):
        report = tmp_path / f"r{len(reports)}.json"
        result = invoke(["eval", "-t", "sentiment", "--data", data, "--model", tiny_models["llama"], "--dtype",
                         "float32", "--shots", "2", "--limit", "4", "--log-samples", "--report", report, "-q", *extra])
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(report.read_text()))
    whole, split = reports
    assert whole["model"]["device_map"] is None
    assert split["model"]["device_map"] == {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.norm": "disk",
                                            "model.rotary_emb": "disk", "model.layers": "disk"}
    assert split["results"][0]["runs"][0]["samples"] == whole["results"][0]["runs"][0]["samples"]
