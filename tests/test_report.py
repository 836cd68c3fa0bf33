"""`llmlab report`: the data behind the plots, the HTML opened in headless Chromium, the PNG files."""

import html
import json
import re
import shutil
import statistics
import subprocess
import tempfile

import pytest

import runfixtures
from helpers import invoke
from llmlab.orchestration import report
from llmlab.runs import runlog

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
_no_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: apt-get install -y chromium "
                                  "(CI installs it) to test the report in a real browser")


def needs_chromium(test):
    """A browser test: skipped without chromium, and slow (a browser process; left out of make test-fast)."""
    return pytest.mark.slow(_no_chromium(test))



@pytest.fixture
def runs(home):
    db = runlog.connect()
    return [runlog.get_run(db, i) for i in runfixtures.two_evals()]


@pytest.fixture
def page(runs, tmp_path):
    out = tmp_path / "report.html"
    result = invoke(["report", "1", "2", "-o", out])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"wrote {out}" in result.stderr
    return out


def test_sweep_is_mean_and_std_over_seeds(runs):
    series = report.sweep(runs)
    assert [s["label"] for s in series] == ["#1 sentiment", "#1 sentiment calibrated", "#2 sentiment-terse",
                                            "#2 sentiment-terse calibrated"]
    stored = [r["metrics"]["accuracy"] for r in runs[0]["metrics"]["results"] if r["shots"] == 4 and r["calibrate"]]
    assert len(stored) == 3
    assert series[1]["points"][2] == (4, statistics.fmean(stored), statistics.stdev(stored), 3)
    assert [p[0] for p in series[0]["points"]] == [0, 1, 4] and series[0]["points"][0][2] == 0.0


def test_confusions_sum_over_seeds(runs):
    found = report.confusions(runs)
    assert len(found) == 12  # 2 runs x 3 shot counts x 2 calibrations
    four = next(c for c in found if c["title"] == "#1 sentiment, 4 shots, calibrated (3 seeds)")
    assert sum(map(sum, four["matrix"])) == 3 * 12  # 3 seeds x 12 items
    assert four["labels"] == ["positive", "negative"]


def test_html_is_self_contained(page):
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from anywhere
    assert "<svg" in text and "<polyline" in text and 'id="matrix"' in text
    # raw JSON inside <script> (not HTML-escaped), with "</" written "<\/" so no prompt can end the script
    prompts = json.loads(re.search(r'id="prompts">(.*?)</script>', text, re.S).group(1))
    exact = [i["prompt"] for i in runlog.items(runlog.connect(), 1)]
    assert exact[0] in prompts and len(prompts) == 2 * 168


def _chromium(*args, timeout=120):
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:  # never the user's profile; one per run
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_report_renders_in_chromium(page, tmp_path):
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri())
    assert shot.is_file(), done.stderr
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1400)
    colours = image.getcolors(maxcolors=1_000_000)
    assert len(colours) > 50  # text, lines, shaded cells: not a blank page
    assert max(count for count, _ in colours) < 0.97 * 1280 * 1400
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    for text in ("Shot sweep", "#1 sentiment calibrated", "#1 sentiment, 4 shots, calibrated (3 seeds)",
                 "gold \\ predicted", "An absolute masterpiece", "168 rows", "summary"):
        assert text in dom, text
    assert "<circle" in dom and dom.count('class="confusion"') == 12


@needs_chromium
def test_filters_and_prompt_in_chromium(page):
    rows = runlog.items(runlog.connect(), 1)
    other = {(i["combo"], i["key"]): i["prediction"] for i in runlog.items(runlog.connect(), 2)}
    differing = sum(i["prediction"] != other[(i["combo"], i["key"])] for i in rows)
    wrong = sum(i["prediction"] != i["gold"] or other[(i["combo"], i["key"])] != i["gold"] for i in rows)
    assert 0 < differing < wrong < 168
    dom = _chromium("--dump-dom", page.as_uri() + "#differing").stdout
    assert f">{differing} rows<" in dom
    assert re.search(r'<button data-mode="differing" class="on">', dom)
    assert f">{wrong} rows<" in _chromium("--dump-dom", page.as_uri() + "#wrong").stdout
    first = _chromium("--dump-dom", page.as_uri() + "#p0").stdout
    shown = re.search(r'<pre id="prompt"[^>]*>(.*?)</pre>', first, re.S).group(1)
    assert html.unescape(shown) == rows[0]["prompt"]


def test_png_files(runs, tmp_path, page):
    pytest.importorskip("matplotlib")
    from PIL import Image

    folder = tmp_path / "png"
    result = invoke(["report", "1", "2", "-o", page, "--png", folder])
    assert result.exit_code == 0, result.stderr
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(["shot-sweep.png", *(f"confusion-{n}.png" for n in range(1, 13))])
    curve = Image.open(folder / "shot-sweep.png")
    assert curve.size == (700, 400) and (folder / "shot-sweep.png").stat().st_size > 10_000
    assert len(curve.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


def test_report_of_a_missing_run(runs, tmp_path):
    result = invoke(["report", "1", "7", "-o", tmp_path / "r.html"])
    assert result.exit_code == 3 and "no run 7 in" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_prompts_and_outputs_cannot_break_the_page():
    from llmlab.orchestration import compare

    nasty = 'Review: </script><script>alert(1)</script> & "quotes"'
    items = [{"idx": 0, "key": "index:0", "combo": "", "template": "t", "prompt": nasty, "prediction": "<b>pos</b>",
              "output": None, "gold": "pos", "probabilities": None, "extra": {"input": {"text": "<i>x</i>"}}}]
    page = report.render([], compare.matrix([{"id": 1}], lambda _: items), title="t")
    assert "<script>alert(1)" not in page and "<b>pos</b>" not in page and "<i>x</i>" not in page
    assert json.loads(re.search(r'id="prompts">(.*?)</script>', page, re.S).group(1)) == [nasty]


@pytest.mark.parametrize("ticks, expected", [
    ([16, 20, 64, 68, 256, 260, 1000, 1004], [16, 64, 256, 1000]),
    ([1, 2, 3, 4, 8], [1, 2, 3, 8]),
    ([5], [5]),
    ([], []),
])
def test_learning_curve_ticks_never_print_on_top_of_each_other(ticks, expected):
    from llmlab.orchestration.report import spread

    assert spread(ticks) == expected
