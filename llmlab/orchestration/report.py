"""`llmlab report`: one self-contained HTML page (inline CSS, JS and SVG; opens with no network) of
logged runs: the shot-sweep curve, learning curves (accuracy against k, from eval runs with adapter
rows), confusion matrices, the comparison matrix with filters and each
item's exact prompt on click. `--png DIR` also writes the plots as PNG files (matplotlib)."""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Mapping, Sequence, TypedDict

from llmlab.core.config import plural
from llmlab.orchestration import compare
from llmlab.runs import runlog

# A colour per series (colour-blind safe, Okabe-Ito).
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


# ---------------------------------------------------------------- data from eval runs


# A logged run as the run log reads it back (runs.runquery): metrics, id, command, templates...
Logged = Mapping[str, object]


class Series(TypedDict):
    """One line of the shot-sweep curve: a point per shot count, (shots, mean, std, seeds)."""

    label: str
    calibrated: bool
    metric: str
    points: list[tuple[int, float, float, int]]


class ConfusionBox(TypedDict):
    """A confusion matrix summed over seeds (rows gold, columns predicted)."""

    title: str
    labels: list[str]
    predicted: list[str]
    matrix: list[list[int]]
    seeds: int


def headline(task: str) -> str:
    return "accuracy" if task == "classify" else "rougeL"


def eval_results(metrics: object) -> list[dict[str, object]]:
    """An eval run's logged results (runlog: metrics["results"], one per seed); [] for other runs."""
    results = metrics.get("results", []) if isinstance(metrics, dict) else []
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _where(run: Logged, r: Mapping[str, object]) -> tuple[int, str, str]:
    """(run id, template, calibration suffix) of a logged result."""
    run_id = run["id"]
    assert isinstance(run_id, int)  # the runs table's INTEGER PRIMARY KEY
    return run_id, str(r["template"]), runlog.calibration_suffix(r.get("calibrate"))


def sweep(runs: Sequence[Logged]) -> list[Series]:
    """Shot-sweep series from eval runs' metrics["results"] (see runlog): one per run x template x
    calibration, a point per shot count with the mean and sample std over seeds."""
    series: dict[tuple[int, str, str], dict[int, list[float]]] = {}  # (run, template, calibration suffix)
    tasks: dict[tuple[int, str, str], str] = {}
    for run in runs:
        for r in eval_results(run.get("metrics")):
            task, values, shots = str(r.get("task", "classify")), r.get("metrics", {}), r["shots"]
            metric = headline(task)
            if not isinstance(values, dict) or metric not in values or r.get("tuned"):  # adapters: learning curves
                continue
            at = _where(run, r)
            series.setdefault(at, {}).setdefault(int(str(shots)), []).append(float(values[metric]))
            tasks[at] = task
    out: list[Series] = []
    for (run_id, template, calibrated), by_shots in series.items():
        points = [(s, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                  for s, v in sorted(by_shots.items())]
        label = f"#{run_id} {template}" + calibrated
        out.append({"label": label, "calibrated": bool(calibrated), "metric": headline(tasks[(run_id, template, calibrated)]),
                    "points": points})
    return out


def _point(r: Mapping[str, object]) -> tuple[tuple[str, str], int, float, str] | None:
    """(template, method), k, the headline metric and its name of one logged result beside adapters
    (in-context learning at its shots and calibration, or an adapter's method); None without a k."""
    k, shots, tuned, numbers = r.get("k"), r.get("shots"), r.get("tuned"), r.get("metrics")
    metric = headline(str(r.get("task", "classify")))
    value = numbers.get(metric) if isinstance(numbers, dict) else None
    if not isinstance(k, int) or not isinstance(value, (int, float)):
        return None
    method = (str(tuned.get("method")) if isinstance(tuned, dict) else
              ", ".join(["in-context", plural(shots if isinstance(shots, int) else 0, "shot"),
                         runlog.calibration(r.get("calibrate"))]).strip(", "))
    return (str(r.get("template")), method), k, float(value), metric


def learning(runs: Sequence[Logged]) -> list[Series]:
    """Learning curves from eval runs with adapter rows (`eval --adapter`, whose results carry k, the
    labelled rows used): one series per template x method (in-context learning at its shots and
    calibration; each adapter method), across the runs, a point per k with the mean and sample std
    over seeds (adapters trained with other seeds, in-context rows' demonstration draws)."""
    series: dict[tuple[str, str], dict[int, list[float]]] = {}
    metrics: dict[tuple[str, str], str] = {}
    for point in (_point(r) for run in runs for r in eval_results(run.get("metrics"))):
        if point is not None:
            at, k, value, metrics[point[0]] = point
            series.setdefault(at, {}).setdefault(k, []).append(value)
    return [{"label": f"{template}: {method}", "calibrated": False, "metric": metrics[(template, method)],
             "points": [(k, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                        for k, v in sorted(by_k.items())]}
            for (template, method), by_k in sorted(series.items())]


def confusions(runs: Sequence[Logged]) -> list[ConfusionBox]:
    """Confusion matrices per run x template x calibration x shots, summed over seeds."""
    found: dict[tuple[int, str, str, int], ConfusionBox] = {}
    for run in runs:
        for r in eval_results(run.get("metrics")):
            values = r.get("metrics", {})
            conf = values.get("confusion") if isinstance(values, dict) else None
            if not conf:
                continue
            where = _where(run, r)
            tuned = r.get("tuned")
            name = where[1] + (f" + {Path(str(r.get('adapter'))).name} ({tuned.get('method')})"
                               if isinstance(tuned, dict) else "")
            at = (where[0], name, where[2], int(str(r["shots"])))
            if at not in found:
                found[at] = {"title": "", "labels": conf["labels"], "predicted": list(conf["predicted"]),
                             "matrix": [[0] * len(conf["predicted"]) for _ in conf["labels"]], "seeds": 0}
            acc = found[at]
            for col in conf["predicted"]:  # an 'unknown' column may appear in some seeds only
                if col not in acc["predicted"]:
                    acc["predicted"].append(col)
                    for row in acc["matrix"]:
                        row.append(0)
            for i, row in enumerate(conf["matrix"]):
                for j, count in enumerate(row):
                    acc["matrix"][i][acc["predicted"].index(conf["predicted"][j])] += count
            acc["seeds"] += 1
    for k, v in found.items():
        v["title"] = (f"#{k[0]} {k[1]}, {plural(k[3], 'shot')}" + ("," + k[2] if k[2] else "") +
                      (f" ({v['seeds']} seeds)" if v["seeds"] > 1 else ""))
    return list(found.values())


# ---------------------------------------------------------------- SVG and HTML pieces


def _colors(series: list[Series]) -> list[str]:
    """One colour per run x template; its calibrated line shares it (and is dashed)."""
    bases = list(dict.fromkeys(s["label"].removesuffix(" calibrated") for s in series))
    return [COLORS[bases.index(s["label"].removesuffix(" calibrated")) % len(COLORS)] for s in series]


def svg_curve(series: list[Series], width: int = 720, height: int = 340, x_label: str = "shots") -> str:
    """Line chart: x = shots (or k, the labelled rows), y = metric (0-100 %), error bars = ± std over
    seeds; dashed = calibrated."""
    left, right, top, bottom = 56, 250, 20, 44  # margins; the legend sits in the right one
    shots = sorted({p[0] for s in series for p in s["points"]})
    x_of = {s: left + (i + 0.5) * (width - left - right) / len(shots) for i, s in enumerate(shots)}
    hi = max(min(1.0, max(p[1] + p[2] for s in series for p in s["points"]) * 1.1), 0.05)

    def y(v: float) -> float:
        return top + (1 - v / hi) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curve" role="img">']

    def where(x: int) -> str:
        return plural(x, "shot") if x_label == "shots" else f"{x_label} {x}"

    for k in range(6):
        v = hi * k / 5
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v * 100:.0f}</text>')
    for count in shots:
        parts.append(f'<text x="{x_of[count]:.1f}" y="{height - bottom + 18}" text-anchor="middle">{count}</text>')
    metric = series[0]["metric"] if series else ""
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">{x_label}</text>'
                 f'<text transform="translate(14 {(top + height - bottom) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(metric)} %</text>')
    for n, (s, color) in enumerate(zip(series, _colors(series))):
        dash = ' stroke-dasharray="6 4"' if s["calibrated"] else ""
        pts = " ".join(f"{x_of[p[0]]:.1f},{y(p[1]):.1f}" for p in s["points"])
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for shot, mean, std, _ in s["points"]:
            cx = x_of[shot]
            if std:
                parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(mean - std):.1f}" y2="{y(mean + std):.1f}" '
                             f'stroke="{color}"/>')
            parts.append(f'<circle cx="{cx:.1f}" cy="{y(mean):.1f}" r="3.5" fill="{color}">'
                         f'<title>{html.escape(s["label"])}: {where(shot)}, {mean * 100:.1f} ± {std * 100:.1f}</title></circle>')
        ly = top + 16 * n + 8
        parts.append(f'<line x1="{width - right + 10}" x2="{width - right + 34}" y1="{ly}" y2="{ly}" stroke="{color}" '
                     f'stroke-width="2"{dash}/><text x="{width - right + 40}" y="{ly + 4}">{html.escape(s["label"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(conf: ConfusionBox) -> str:
    """Rows: gold label; columns: predicted; cell shade = share of the gold row."""
    head = "".join(f"<th>{html.escape(p)}</th>" for p in conf["predicted"])
    body = []
    for label, row in zip(conf["labels"], conf["matrix"]):
        total = sum(row) or 1
        cells = "".join(f'<td style="background:rgba(0,114,178,{c / total * 0.85:.2f});'
                        f'color:{"#fff" if c / total > 0.5 else "#000"}">{c}</td>' for c in row)
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return (f'<figure class="confusion"><figcaption>{html.escape(conf["title"])}</figcaption><table>'
            f'<tr><th>gold \\ predicted</th>{head}</tr>{"".join(body)}</table></figure>')


def matrix_table(m: compare.Matrix) -> tuple[str, list[str]]:
    """The comparison table (filters via data- attributes) and the prompts it points at by number."""
    prompts: list[str] = []
    head = "".join(f"<th>{html.escape(c.label)}</th>" for c in m.columns)
    combo_col = any(r.combo for r in m.rows)
    body = []
    for row in m.rows:
        cells = []
        for cell in row.cells:
            if cell is None:
                cells.append('<td class="none">-</td>')
                continue
            prompts.append(cell.prompt)
            mark = {True: '<span class="ok">✓</span> ', False: '<span class="bad">✗</span> ', None: ""}[cell.correct]
            cells.append(f'<td class="cell" data-p="{len(prompts) - 1}" title="click: the exact prompt">'
                         f'{mark}{html.escape(cell.value)}</td>')
        combo = f"<td>{html.escape(row.combo)}</td>" if combo_col else ""
        body.append(f'<tr data-differs="{int(row.differs)}" data-wrong="{int(row.wrong)}" '
                    f'data-combo="{html.escape(row.combo)}">{combo}<td>{html.escape(row.key)}</td>'
                    f'<td class="input">{html.escape(row.input)}</td><td>{html.escape(row.gold or "")}</td>'
                    f'{"".join(cells)}</tr>')
    metrics = "".join(f"<td>{c.metric_name} {c.metric * 100:.1f}%</td>" if c.metric is not None else "<td></td>"
                      for c in m.columns)
    lead = "<th>combination</th>" if combo_col else ""
    pad = "<td></td>" if combo_col else ""
    table = (f'<table id="matrix"><thead><tr>{lead}<th>key</th><th>input</th><th>gold</th>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody><tfoot><tr class="summary">{pad}<td colspan="3">summary</td>{metrics}'
             f"</tr></tfoot></table>")
    return table, prompts


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top;text-align:left}
.curve text{font-size:12px;fill:#333}.confusion{display:inline-block;margin:0 18px 14px 0}
.confusion td{text-align:right;min-width:38px}figcaption{font-weight:600;margin-bottom:4px}
#matrix td.cell{cursor:pointer}#matrix td.cell:hover{background:#eef}#matrix td.input{max-width:420px}
.ok{color:#009E73;font-weight:700}.bad{color:#D55E00;font-weight:700}.summary td{font-weight:600;background:#f5f5f5}
#filters button{margin-right:6px}#filters button.on{background:#0072B2;color:#fff}
#prompt{white-space:pre-wrap;background:#f7f7f7;border:1px solid #ccc;padding:10px;max-height:400px;overflow:auto}
.muted{color:#777}
"""

JS = r"""
const prompts = JSON.parse(document.getElementById('prompts').textContent);
let mode = 'all';
function apply() {
  const combo = document.getElementById('combo') ? document.getElementById('combo').value : '';
  let shown = 0;
  for (const tr of document.querySelectorAll('#matrix tbody tr')) {
    const ok = (mode === 'all' || (mode === 'differing' && tr.dataset.differs === '1') ||
                (mode === 'wrong' && tr.dataset.wrong === '1')) && (!combo || tr.dataset.combo === combo);
    tr.style.display = ok ? '' : 'none'; shown += ok;
  }
  document.getElementById('shown').textContent = shown + ' rows';
}
for (const b of document.querySelectorAll('#filters button')) b.onclick = () => {
  mode = b.dataset.mode;
  for (const o of document.querySelectorAll('#filters button')) o.classList.toggle('on', o === b);
  apply();
};
if (document.getElementById('combo')) document.getElementById('combo').onchange = apply;
function show(n) {
  const pre = document.getElementById('prompt');
  pre.textContent = prompts[n]; pre.classList.remove('muted');
}
document.getElementById('matrix').onclick = (e) => {
  const td = e.target.closest('td.cell'); if (td) show(+td.dataset.p);
};
// Links into the page: #differing or #wrong picks the filter, #p12 shows prompt 12.
const want = location.hash.slice(1);
const button = document.querySelector(`#filters button[data-mode="${want}"]`);
if (button) button.click(); else apply();
if (/^p\d+$/.test(want) && prompts[+want.slice(1)] !== undefined) show(+want.slice(1));
"""


def _strings(value: object, key: str | None = None) -> list[str]:
    """A logged list as text: its items (argv), or each item's `key` (the templates' names)."""
    items = value if isinstance(value, list) else []
    return [str(i) for i in items] if key is None else [str(i[key]) for i in items if isinstance(i, dict)]


def _runs_table(runs: Sequence[Logged]) -> str:
    rows = "".join(
        f"<tr><td>{r['id']}</td><td>{html.escape(str(r['command']))}</td><td>{html.escape(str(r.get('model') or ''))}</td>"
        f"<td>{html.escape(', '.join(_strings(r.get('templates'), 'name')))}</td><td>{r['status']}</td>"
        f"<td>{r['n_items']}</td><td>{html.escape(' '.join(_strings(r.get('argv'))))}</td></tr>" for r in runs)
    return ("<table><tr><th>run</th><th>command</th><th>model</th><th>templates</th><th>status</th>"
            f"<th>items</th><th>command line</th></tr>{rows}</table>")


def render(runs: Sequence[Logged], m: compare.Matrix, title: str | None = None) -> str:
    """The whole page as one string."""
    series = sweep(runs)
    curve = svg_curve(series) if series else '<p class="muted">No eval runs with shot counts among these runs.</p>'
    curves = learning(runs)
    learned = (f"<h2>Learning curves</h2>{svg_curve(curves, x_label='k (labelled rows)')}"
               '<p class="muted">k: the labelled rows each row used (in-context: demonstrations + the probe\'s '
               "rows; adapters: the rows `llmlab tune` drew); ± std over seeds.</p>") if curves else ""
    confs = "".join(confusion_table(c) for c in confusions(runs)) or '<p class="muted">No confusion matrices.</p>'
    table, prompts = matrix_table(m)
    combos = sorted({r.combo for r in m.rows if r.combo})
    picker = ('<select id="combo"><option value="">every combination</option>' +
              "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in combos) +
              "</select>") if combos else ""
    # Every "<" as \u003c: no prompt text can end (or confuse) the <script> element holding them.
    data = json.dumps(prompts, ensure_ascii=False).replace("<", "\\u003c")
    title = title or "llmlab report: runs " + ", ".join(f"#{r['id']}" for r in runs)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>
{_runs_table(runs) if runs else ""}
<h2>Shot sweep</h2>{curve}{learned}
<h2>Confusion matrices</h2>{confs}
<h2>Comparison</h2><div id="filters"><button data-mode="all" class="on">all</button>
<button data-mode="differing">differing</button><button data-mode="wrong">wrong</button> {picker}
<span id="shown" class="muted"></span></div><p class="muted">Click a cell for its exact prompt.</p>
{table}<h3>Prompt</h3><pre id="prompt" class="muted">(click a cell)</pre>
<script type="application/json" id="prompts">{data}</script><script>{JS}</script></body></html>
"""


# ---------------------------------------------------------------- PNG (matplotlib)


def spread(ticks: Sequence[int], ratio: float = 1.4) -> list[int]:
    """Ticks of a log axis whose labels cannot overlap: each kept one at least `ratio` times the last
    (k = 256 for an adapter and 260 for 4 shots + 256 probe rows would print on top of each other)."""
    kept: list[int] = []
    for t in sorted(ticks):
        if not kept or t >= kept[-1] * ratio:
            kept.append(t)
    return kept


def write_pngs(runs: Sequence[Logged], folder: Path) -> list[Path]:
    """The curve and each confusion matrix as PNG files in `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for series, name, x_label in ((sweep(runs), "shot-sweep", "shots"),
                                  (learning(runs), "learning-curves", "k (labelled rows)")):
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for s, color in zip(series, _colors(series)):
            xs, means, stds = [p[0] for p in s["points"]], [p[1] * 100 for p in s["points"]], [p[2] * 100 for p in s["points"]]
            ax.errorbar(xs, means, yerr=stds, label=s["label"], color=color, capsize=3,
                        linestyle="--" if s["calibrated"] else "-", marker="o")
        if name == "learning-curves":
            ax.set_xscale("symlog")  # k from a few rows to thousands
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{series[0]['metric']} %")
        ticks = sorted({p[0] for s in series for p in s["points"]})
        ticks = spread(ticks) if name == "learning-curves" else ticks
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(x) for x in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / f"{name}.png")
        fig.savefig(written[-1])
        plt.close(fig)
    for n, conf in enumerate(confusions(runs)):
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(conf["predicted"]), 1.2 + 0.8 * len(conf["labels"])), dpi=100)
        ax.imshow(conf["matrix"], cmap="Blues")
        ax.set_xticks(range(len(conf["predicted"])), conf["predicted"], rotation=30)
        ax.set_yticks(range(len(conf["labels"])), conf["labels"])
        for i, row in enumerate(conf["matrix"]):
            for j, c in enumerate(row):
                ax.text(j, i, str(c), ha="center", va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(conf["title"], fontsize=8)
        fig.tight_layout()
        written.append(folder / f"confusion-{n + 1}.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written
