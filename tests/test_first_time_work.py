"""Long first-time work (a probe fit, a similar-shot index) says so on stderr in one line even when
piped or written with -o, once (the next run finds it cached), and never with -q."""

import pytest

from helpers import invoke


def said(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


@pytest.mark.slow
@pytest.mark.parametrize("extra, text", [
    ([], "fitting the probe: 120 rows of "),  # the sentiment template's default: 4 shots + a probe
    (["--calibration", "off", "--shot-selection", "similar-hidden", "--shots", "2"], "indexing 8 pool rows for similar shots"),
], ids=["probe", "similar-index"])
def test_long_first_time_work_is_announced_once_even_piped(tiny_models, tmp_path, monkeypatch, extra, text):
    args = ["classify", "-t", "sentiment", "a charming film", "-m", tiny_models["llama"], *extra]
    first = invoke(args + ["-o", tmp_path / "a.jsonl"])
    assert first.exit_code == 0, first.stderr
    assert len(said(first.stderr, text)) == 1, first.stderr
    again = invoke(args + ["-o", tmp_path / "b.jsonl"])
    assert again.exit_code == 0 and said(again.stderr, text) == [], again.stderr  # cached now
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "fresh-cache"))
    quiet = invoke(args + ["-q", "-o", tmp_path / "c.jsonl"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
