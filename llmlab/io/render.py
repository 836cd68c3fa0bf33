"""Tables for people: rich on a terminal, aligned plain text when piped. Only the CLI calls these;
they return text or print to stdout (data), never to stderr."""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any, Sequence

from llmlab.core.console import rate_text


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

        table = Table(*headers, title=title, caption=caption, caption_justify="left")
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


def clip(text: Any, width: int = 60) -> str:
    shown = " ".join(str(text).split())
    return shown if len(shown) <= width else shown[: width - 3] + "..."


# ---------------------------------------------------------------- classify


def classifications(results: Sequence[Any], labels: Sequence[str], field: str, target: str | None) -> None:
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
    if labeled:
        right = sum(r.prediction == str(r.item.fields[target]) for r in labeled)
        footer = f"accuracy {100 * right / len(labeled):.1f}% ({right} of {len(labeled)} labeled inputs)"
    show(headers, rows, footer=footer)


# ---------------------------------------------------------------- eval


def pct(stat: dict[str, float], scale: float = 100.0) -> str:
    """mean ± std, then [min–max] when the seeds differ."""
    text = f"{stat['mean'] * scale:.1f}"
    if stat.get("std"):
        text += f" ± {stat['std'] * scale:.1f}"
    if stat.get("max", stat["mean"]) != stat.get("min", stat["mean"]):
        text += f" [{stat['min'] * scale:.1f}–{stat['max'] * scale:.1f}]"
    return text


def summed_confusion(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], list[list[int]]]:
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
        parts.append(f"{label}:{p:.0f}/{r:.0f}")
    return " ".join(parts)


def eval_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    results = report["results"]
    classify = any(r["task"] == "classify" for r in results)
    generate = any(r["task"] == "generate" for r in results)
    headers = ["template", "data", "shots", "calibration", "seeds", "n"]
    if classify:
        headers += ["accuracy %", "macro-F1 %", "P/R % (all seeds)", "confusion (all seeds, rows gold)"]
    if generate:
        headers += ["ROUGE-1", "ROUGE-2", "ROUGE-L", "exact %"]
    costs = any("cost" in r for r in results)
    headers += COST_HEADERS if costs else []
    headers.append("items/s")
    rows = []
    for r in results:
        s = r["summary"]
        sources = r.get("sources") or {}
        row = [r["template"], r.get("data_name", ""), _sourced(r["shots"], sources.get("shots")),
               _sourced(_calibration(r["calibrate"]), sources.get("calibrate")),
               str(len(r["seeds"])), str(r["runs"][0]["items"])]
        if classify:
            if r["task"] == "classify":
                labels, columns, matrix = summed_confusion(r["runs"])
                conf = " ".join(f"{lab}:[{','.join(map(str, row_))}]" for lab, row_ in zip(labels, matrix))
                row += [pct(s["accuracy"]), pct(s["macro_f1"]), precision_recall(labels, columns, matrix), conf]
            else:
                row += ["", "", "", ""]
        if generate:
            if r["task"] == "generate":
                row += [pct(s["rouge1"]), pct(s["rouge2"]), pct(s["rougeL"]), pct(s["exact_match"])]
            else:
                row += ["", "", "", ""]
        row += cost_cells(r) if costs else []
        row.append(rate_text(s["items_per_s"]))
        rows.append(row)
    return headers, rows


COST_HEADERS = ["model", "k", "train s", "trainable", "adapter", "prompt tok/item", "GFLOPs/item",
                "Δ acc vs in-context [95% CI]"]


def cost_cells(result: dict[str, Any]) -> list[str]:
    """eval --adapter's columns: which model, the labelled rows used, training time, trainable
    parameters, adapter size, prompt tokens and inference GFLOPs per item ("-": not applicable)."""
    c = result.get("cost") or {}
    dash = lambda v, f: "-" if v is None else f(v)  # noqa: E731
    return [result.get("model", "base"), dash(c.get("k"), str), dash(c.get("train_seconds"), lambda v: f"{v:.0f}"),
            dash(c.get("trainable_params"), lambda v: f"{v:,}"), dash(c.get("adapter_bytes"), size_text),
            dash(c.get("prompt_tokens"), lambda v: f"{v:.1f}"),
            dash(c.get("flops_per_item"), lambda v: f"{v / 1e9:.1f}"),
            dash(c.get("vs_in_context"), lambda v: f"{100 * v['diff']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]")]


EVAL_CAPTION = ("accuracy, macro-F1, ROUGE: mean ± std over seeds [min–max]; P/R and confusion: all seeds' "
                "predictions summed (columns in label order, then unknown); items/s: mean over seeds (a calibration "
                "method after the first reuses the label scores: its items/s counts only its own work)")


def _sourced(value: Any, source: str | None) -> str:
    """A resolved setting: `4 (template)` when the template's own default gave it, else just `4`."""
    return f"{value} (template)" if source == "template" else str(value)


def _calibration(value: Any) -> str:
    """The calibration method of a combination (reports from before methods had names hold a bool)."""
    if isinstance(value, bool):
        return "contextual" if value else "off"
    return str(value)


def eval_table(report: dict[str, Any]) -> None:
    headers, rows = eval_rows(report)
    datas = {(d["name"], d["items"]) for d in report["data"]}
    title = f"{report['model']['name']} on " + ", ".join(f"{n} ({k} items)" for n, k in sorted(datas))
    show(headers, rows, title=title, caption=EVAL_CAPTION)


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


def template_info(template: Any) -> list[tuple[str, str]]:
    """`llmlab prompt show`: what a template is made of, as (key, value) rows."""
    from llmlab.core.settings import build, normalize_keys

    settings = build(normalize_keys(template.generation, template.name) if template.generation else {})
    pool = str(template.examples_path) if template.examples_path else "inline in the template"
    labels = ", ".join(f"{k} ({v})" if v != k else k for k, v in template.labels.items())
    defaults = (f"chat {template.chat or 'auto'}, shot format {template.shot_format or 'turns'}, shot selection "
                f"{'balanced' if template.task == 'classify' else 'first'}, max_new_tokens {settings.max_new_tokens}")
    if settings.stop:
        defaults += f", stop {settings.stop!r}"
    rows = [("name", template.name), ("file", str(template.path)), ("task", template.task),
            ("description", template.description), ("fields", ", ".join(template.fields)),
            ("target", template.target or "-")]
    if template.task == "classify":
        rows.append(("labels", labels))
    if template.references:
        rows.append(("references", ", ".join(template.references)))
    rows += [("examples", f"{len(template.examples)} ({pool})"), ("defaults", defaults)]
    return rows


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


def coloured(tokens: Sequence[Any], before: str = "") -> Any:
    """A completion as rich Text: `before` plain, then each token's text in its probability's colour."""
    from rich.text import Text

    line = Text(before)
    for t in tokens:
        line.append(t.text, style=prob_style(t.logprob))
    return line


def token_probabilities(job: Any, output: Any, echo: bool) -> None:
    """One prompt's completions on a terminal, each token coloured by how likely the model found
    it (a legend follows); with --top-logprobs, a table of every step's alternatives."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    for n, tokens in enumerate(output.logprobs):
        line = coloured(tokens, job.prompt if echo else "")
        out.print(Text(f"[{n + 1}] ") + line if len(output.logprobs) > 1 else line)
    legend = Text("token colour = its probability under the model: ", style="dim")
    for n, band in enumerate(prob_bands()):
        legend.append("  " if n else "").append(*band)
    out.print(legend)
    for n, tokens in enumerate(output.logprobs):
        if not any(t.top for t in tokens):
            continue
        table = Table("#", "token", "p", "alternatives (most likely first)",
                      title=f"completion {n + 1}" if len(output.logprobs) > 1 else None)
        for k, t in enumerate(tokens):
            alts = Text()
            for text, _, lp in t.top:
                alts.append(repr(text), style=prob_style(lp)).append(f" {prob_text(lp)}  ")
            table.add_row(str(k + 1), Text(repr(t.text), style=prob_style(t.logprob)), prob_text(t.logprob), alts)
        out.print(table)
