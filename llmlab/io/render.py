"""Tables for people: rich on a terminal, aligned plain text when piped. Only the CLI calls these;
they return text or print to stdout (data), never to stderr."""

from __future__ import annotations

import math
import statistics
import sys
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

from llmlab.core.config import plural  # noqa: F401 - used here and by the commands
from llmlab.core.console import rate_text
from llmlab.io.evalreport import ClassifyMetrics, MetricName, Report, Result, SeedRun, Stat
from llmlab.io.items import Item

if TYPE_CHECKING:
    from rich.text import Text


class Classified(Protocol):
    """A classify result as the table shows it (llmlab.scoring.classify.Classification)."""

    @property
    def item(self) -> Item: ...
    @property
    def prediction(self) -> str: ...
    @property
    def probabilities(self) -> Mapping[str, float]: ...


class Token(Protocol):
    """One generated token with its log-probability (llmlab.backends.base.TokenLogprob)."""

    @property
    def text(self) -> str: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> Sequence[tuple[str, int, float]]: ...


class Prompted(Protocol):
    @property
    def prompt(self) -> str: ...


class Generated(Protocol):
    """A generation's output with --logprobs (llmlab.backends.base.GenOutput)."""

    @property
    def logprobs(self) -> Sequence[Sequence[Token]] | None: ...



def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def show(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
         caption: str | None = None, footer: str | None = None) -> None:
    """A rich table on a terminal; plain text (title, header, rows, caption lines) otherwise."""
    from llmlab.core import console

    if console.stdout_is_terminal():
        from rich.console import Console
        from rich.table import Table

        from rich.table import Column

        # overflow fold: a long word (a data file's name) wraps inside its cell, never cut to "…"
        table = Table(*(Column(h, overflow="fold") for h in headers), title=title, caption=caption,
                      caption_justify="left")
        for row in rows:
            table.add_row(*row)
        out = Console(file=sys.stdout)
        out.print(table)
        if footer:
            out.print(footer, markup=False, highlight=False)
        return
    text = (f"{title}\n" if title else "") + plain_table(headers, rows)
    text += f"{caption}\n" if caption else ""
    text += f"{footer}\n" if footer else ""
    sys.stdout.write(text)


def clip(text: object, width: int = 60) -> str:
    shown = " ".join(str(text).split())
    return shown if len(shown) <= width else shown[: width - 3] + "..."


# ---------------------------------------------------------------- classify


def classifications(results: Sequence[Classified], labels: Sequence[str], field: str, target: str | None) -> None:
    """One row per input: the input, the gold label and a mark when the input has one, the prediction
    and every label's probability; then an accuracy line over the labeled rows."""
    labeled = [r for r in results if target and target in r.item.fields]
    headers = ["#", "input"] + (["gold", "ok"] if labeled else []) + ["prediction", *labels]
    rows = []
    for r in results:
        row = [str(r.item.index), clip(r.item.fields.get(field, ""))]
        if labeled:
            gold = r.item.fields.get(target) if target else None
            row += ["", ""] if gold is None else [str(gold), "✓" if r.prediction == str(gold) else "✗"]
        row += [r.prediction, *(f"{r.probabilities[label]:.3f}" for label in labels)]
        rows.append(row)
    footer = None
    if labeled and target:  # labeled: target is set
        right = sum(r.prediction == str(r.item.fields[target]) for r in labeled)
        footer = f"accuracy {100 * right / len(labeled):.1f}% ({right} of {len(labeled)} labeled inputs)"
    show(headers, rows, footer=footer)


def classify_summary(metrics: ClassifyMetrics, path: str) -> str:
    """classify -o's closing line: 'wrote 40 predictions to out.jsonl; accuracy 85.0% on 40 labeled inputs'."""
    line = f"wrote {plural(metrics['items'], 'prediction')} to {path}"
    if metrics.get("labeled"):
        line += f"; accuracy {100 * metrics['accuracy']:.1f}% on {plural(metrics['labeled'], 'labeled input')}"
    return line


# ---------------------------------------------------------------- eval


def pct(stat: Stat, scale: float = 100.0) -> str:
    """mean ± std, then [min–max] when the seeds differ."""
    text = f"{stat['mean'] * scale:.1f}"
    if stat.get("std"):
        text += f" ± {stat['std'] * scale:.1f}"
    if stat.get("max", stat["mean"]) != stat.get("min", stat["mean"]):
        text += f" [{stat['min'] * scale:.1f}–{stat['max'] * scale:.1f}]"
    return text


def summed_confusion(runs: Sequence[SeedRun]) -> tuple[list[str], list[str], list[list[int]]]:
    """The confusion matrices of every seed added up (rows gold, columns predicted)."""
    labels = runs[0]["metrics"]["confusion"]["labels"]
    columns = list(labels)
    for run in runs:
        for c in run["metrics"]["confusion"]["predicted"]:
            if c not in columns:
                columns.append(c)
    total = [[0] * len(columns) for _ in labels]
    for run in runs:
        conf = run["metrics"]["confusion"]
        for i, row in enumerate(conf["matrix"]):
            for name, count in zip(conf["predicted"], row):
                total[i][columns.index(name)] += count
    return labels, columns, total


def precision_recall(labels: Sequence[str], columns: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    parts = []
    for i, label in enumerate(labels):
        tp = matrix[i][columns.index(label)]
        predicted = sum(row[columns.index(label)] for row in matrix)
        actual = sum(matrix[i])
        p = 100 * tp / predicted if predicted else 0.0
        r = 100 * tp / actual if actual else 0.0
        parts.append(f"{label} {p:.0f}/{r:.0f}")
    return ", ".join(parts)


def mean_std(stat: Stat, scale: float = 100.0) -> str:
    """mean ± std (the table's cell; the range is in the detail and the report)."""
    text = f"{stat['mean'] * scale:.1f}"
    return text + (f" ± {stat['std'] * scale:.1f}" if stat.get("std") else "")


METRICS: dict[str, list[tuple[str, MetricName]]] = {"classify": [("accuracy %", "accuracy"), ("macro-F1 %", "macro_f1")],
           "generate": [("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"), ("exact %", "exact_match")]}


def eval_rows(report: Report, task: str) -> tuple[list[str], list[list[str]]]:
    """The table of one task's combinations: what fits 120 columns (per-label detail: eval_detail)."""
    headers = ["template", "data", "shots", "calibration", "seeds", "n", *(h for h, _ in METRICS[task]), "items/s"]
    rows = []
    for r in (r for r in report["results"] if r["task"] == task):
        s = r["summary"]
        sources = r.get("sources") or {}
        rows.append([r["template"], r.get("data_name", ""), _sourced(r["shots"], sources.get("shots")),
                     _sourced(_calibration(r["calibrate"]), sources.get("calibrate")), str(len(r["seeds"])),
                     str(r["runs"][0]["items"]), *(mean_std(s[k]) for _, k in METRICS[task]),
                     rate_text(s["items_per_s"])])
    return headers, rows


EVAL_CAPTION = ("mean ± std over seeds; items/s: mean over seeds (a calibration method after the first reuses the\n"
                "label scores: its items/s counts only its own work); --detail: min–max, per-label precision/recall\n"
                "and confusion; --report FILE: every number as JSON")


def eval_detail(report: Report) -> list[str]:
    """Under the table (eval --detail): each combination's min–max over seeds and, for classify, its
    per-label precision/recall and confusion matrix (every seed's predictions summed)."""
    lines = []
    for r in report["results"]:
        seeds = len(r["seeds"])
        lines.append(f"{r['template']} on {r.get('data_name', '')}: {plural(r['shots'], 'shot')}, calibration "
                     f"{_calibration(r['calibrate'])}, {plural(seeds, 'seed')}")
        lines.append("  " + ", ".join(f"{h.removesuffix(' %')} {pct(r['summary'][k])}" for h, k in METRICS[r["task"]]))
        if r["task"] != "classify":
            continue
        labels, columns, matrix = summed_confusion(r["runs"])
        lines.append(f"  precision/recall %: {precision_recall(labels, columns, matrix)}")
        lines.append(f"  confusion (rows gold, columns {', '.join(columns)}): "
                     + "  ".join(f"{lab} [{', '.join(map(str, row))}]" for lab, row in zip(labels, matrix)))
    return lines


COST_HEADERS = ["model", "k", "train s", "trainable", "adapter", "prompt tok/item", "GFLOPs/item",
                "Δ acc vs in-context [95% CI]"]


def cost_cells(result: Result) -> list[str]:
    """eval --adapter's columns: which model, the labelled rows used, training time, trainable
    parameters, adapter size, prompt tokens and inference GFLOPs per item ("-": not applicable)."""
    c = result.get("cost") or {}
    dash = lambda v, f: "-" if v is None else f(v)  # noqa: E731
    return [result.get("model", "base"), dash(c.get("k"), str), dash(c.get("train_seconds"), lambda v: f"{v:.0f}"),
            dash(c.get("trainable_params"), lambda v: f"{v:,}"), dash(c.get("adapter_bytes"), size_text),
            dash(c.get("prompt_tokens"), lambda v: f"{v:.1f}"),
            dash(c.get("flops_per_item"), lambda v: f"{v / 1e9:.1f}"),
            dash(c.get("vs_in_context"), lambda v: f"{100 * v['diff']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]")]


def _sourced(value: object, source: str | None) -> str:
    """A resolved setting: `4 (template)` when the template's own default gave it, else just `4`."""
    return f"{value} (template)" if source == "template" else str(value)


def _calibration(value: object) -> str:
    """The calibration method of a combination (reports from before methods had names hold a bool)."""
    if isinstance(value, bool):
        return "contextual" if value else "off"
    return str(value)


def eval_table(report: Report, detail: bool = False) -> None:
    """One table per task (classify, generate), each within 120 columns; with detail, the per-label
    numbers under it. Every number is also in the JSON report (eval --report)."""
    datas = {(d["name"], d["items"]) for d in report["data"]}
    title = f"{report['model']['name']} on " + ", ".join(f"{n} ({k} items)" for n, k in sorted(datas))
    tasks = [t for t in METRICS if any(r["task"] == t for r in report["results"])]
    costs = [r for r in report["results"] if "cost" in r]  # eval --adapter: a table of its own
    for n, task in enumerate(tasks):
        last = n == len(tasks) - 1 and not costs
        show(*eval_rows(report, task), title=title if n == 0 else None, caption=EVAL_CAPTION if last else None,
             footer="\n".join(eval_detail(report)) if last and detail else None)
    if costs:
        show(["template", "shots", "calibration", *COST_HEADERS],
             [[r["template"], str(r["shots"]), _calibration(r["calibrate"]), *cost_cells(r)] for r in costs],
             title="cost", caption=EVAL_CAPTION, footer="\n".join(eval_detail(report)) if detail else None)


# ---------------------------------------------------------------- prompt render / show / models


def token_summary(counts: Sequence[int], window: int | None, budget: int | None) -> str:
    """min / median / max prompt tokens and how many prompts exceed the budget."""
    line = (f"{len(counts)} prompts: tokens min {min(counts)}, median {statistics.median(counts):g}, "
            f"max {max(counts)}")
    if window:
        over = sum(c > budget for c in counts) if budget is not None else 0
        line += f"; window {window}" + (f" ({budget} for the prompt)" if budget != window else "")
        line += f", {over} over"
    return line


def size_text(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


# ---------------------------------------------------------------- generate --logprobs

# Token colours by probability p = exp(logprob), from sure to surprising: (lowest p, style).
PROB_BANDS = ((0.9, "green"), (0.5, "yellow"), (0.1, "dark_orange"), (0.0, "red"))


def prob_style(logprob: float) -> str:
    p = math.exp(logprob)
    return next(style for low, style in PROB_BANDS if p >= low)


def prob_bands() -> list[tuple[str, str]]:
    """(label, style) of each band of PROB_BANDS, for the legend: ">= 90%", "50-90%", ..., "< 10%"."""
    lows = [round(100 * low) for low, _ in PROB_BANDS]
    labels = [f">= {lows[0]}%"] + [f"{lo}-{hi}%" for lo, hi in zip(lows[1:-1], lows)] + [f"< {lows[-2]}%"]
    return [(label, style) for label, (_, style) in zip(labels, PROB_BANDS)]


def prob_text(logprob: float) -> str:
    return f"{100 * math.exp(logprob):.1f}%"


def coloured(tokens: Sequence[Token], before: str = "") -> Text:
    """A completion as rich Text: `before` plain, then each token's text in its probability's colour."""
    from rich.text import Text

    line = Text(before)
    for t in tokens:
        line.append(t.text, style=prob_style(t.logprob))
    return line


def token_probabilities(job: Prompted, output: Generated, echo: bool) -> None:
    """One prompt's completions on a terminal, each token coloured by how likely the model found
    it (a legend follows); with --top-logprobs, a table of every step's alternatives."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    logprobs = output.logprobs or []  # shown only for a generation run with --logprobs
    for n, tokens in enumerate(logprobs):
        line = coloured(tokens, job.prompt if echo else "")
        out.print(Text(f"[{n + 1}] ") + line if len(logprobs) > 1 else line)
    legend = Text("token colour = its probability under the model: ", style="dim")
    for n, band in enumerate(prob_bands()):
        legend.append("  " if n else "").append(*band)
    out.print(legend)
    for n, tokens in enumerate(logprobs):
        if not any(t.top for t in tokens):
            continue
        table = Table("#", "token", "p", "alternatives (most likely first)",
                      title=f"completion {n + 1}" if len(logprobs) > 1 else None)
        for k, t in enumerate(tokens):
            alts = Text()
            for text, _, lp in t.top:
                alts.append(repr(text), style=prob_style(lp)).append(f" {prob_text(lp)}  ")
            table.add_row(str(k + 1), Text(repr(t.text), style=prob_style(t.logprob)), prob_text(t.logprob), alts)
        out.print(table)
