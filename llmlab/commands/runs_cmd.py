"""`llmlab runs ...`, `llmlab compare` and `llmlab report`: find, compare and show logged runs.

Imports only typer, rich and the standard library at module level (`llmlab --help` stays instant).
Tables on a terminal; JSONL or TSV when stdout is piped (data only; notes go to stderr).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, TypedDict

import typer

from llmlab.core import console
from llmlab.core.config import plural
from llmlab.commands.tables import check_choice as _check_choice, cut as _cut, print_table as _print_table, show_matrix as _show_matrix, tty as _tty, written
from llmlab.core.errors import UsageError
from llmlab.io.records import check_output_path

runs_app = typer.Typer(help="The run log: list, show, search, compare, export and delete logged runs.",
                       no_args_is_help=True)

# For generate/classify/eval (the integrator adds it): `no_log: runs_cli.NoLog = False`.
NoLog = Annotated[bool, typer.Option("--no-log", help="Don't record this run in the run log (also LLMLAB_LOG=0).")]
Json = Annotated[bool, typer.Option("--json", help="JSON lines, even on a terminal.")]
RunId = Annotated[int, typer.Argument(help="A run id (see `llmlab runs list`).")]


def _db(write: bool = False):
    from llmlab.runs import runlog

    path = runlog.db_path()
    if not path.exists():
        raise UsageError(f"no run log yet at {path}: run llmlab generate, classify or eval first")
    return runlog.connect(path, read_only=not write)  # reading works on read-only media too


def _tsv(values: list[object]) -> str:
    return "\t".join("" if v is None else str(v).replace("\t", " ").replace("\n", " ") for v in values)


def _when(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


def _headline(run: Mapping[str, object]) -> str:
    """A run's main metric: accuracy or ROUGE-L; for eval runs the best combination's mean."""
    from llmlab.orchestration import report

    metrics = run.get("metrics")
    series = report.sweep([run])
    if series:
        best = max(((p[1], p[0], s) for s in series for p in s["points"]), key=lambda t: t[0])
        return f"{best[2]['metric']} {best[0] * 100:.1f} ({plural(best[1], 'shot')})"
    for name in ("accuracy", "rougeL"):
        value = metrics.get(name) if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)):
            return f"{name} {value * 100:.1f}"
    return ""


class RunSummary(TypedDict):
    """A run in `runs list` (and the head of `runs show`)."""

    id: int
    created: str
    command: str
    status: str
    model: Optional[str]
    templates: list[str]
    items: int
    seconds: Optional[float]
    metric: str


def _summary(run: dict[str, Any]) -> RunSummary:  # a row of runs.runquery (SQLite columns, JSON decoded)
    return {"id": run["id"], "created": _when(run["created"]), "command": run["command"], "status": run["status"],
            "model": run["model"], "templates": [t["name"] for t in run["templates"]], "items": run["n_items"],
            "seconds": None if run["seconds"] is None else round(run["seconds"], 2), "metric": _headline(run)}


@runs_app.command("list")
def runs_list(
    command: Annotated[Optional[str], typer.Option("--command", "-c", help="Only this command: generate, classify, eval, compare.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only models whose name contains this.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Only runs of this template (name or hash prefix).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many runs.")] = 50,
    json_out: Json = False,
) -> None:
    """The logged runs, newest first."""
    from llmlab.runs import runlog

    found = [_summary(r) for r in runlog.list_runs(_db(), command, model, template, limit)]
    if json_out:
        for s in found:
            print(json.dumps(s, ensure_ascii=False))
    elif _tty():
        _print_table(["id", "when", "command", "status", "model", "templates", "items", "metric"],
                     [[str(s["id"]), s["created"], s["command"], s["status"], s["model"] or "",
                       ", ".join(s["templates"]), str(s["items"]), s["metric"]] for s in found])
    else:
        for s in found:
            print(_tsv([s["id"], s["created"], s["command"], s["status"], s["model"], ",".join(s["templates"]),
                        s["items"], s["metric"]]))


@runs_app.command("show")
def runs_show(run_id: RunId, show_items: Annotated[bool, typer.Option("--items", help="Also each item.")] = False,
              json_out: Json = False) -> None:
    """A run's command line, model, templates, settings, versions and metrics (and items with --items)."""
    from llmlab.runs import runlog

    db = _db()
    run = runlog.get_run(db, run_id)
    fields = {**_summary(run), "argv": run["argv"], "device": run["device"], "data": run["data"],
              "config": run["config"], "versions": run["versions"], "metrics": run["metrics"],
              "template_hashes": {t["name"]: t["hash"] for t in run["templates"]}}
    listed = runlog.items(db, run_id) if show_items else []
    if json_out or not _tty():
        if json_out:
            print(json.dumps({**fields, **({"items": listed} if show_items else {})}, ensure_ascii=False, default=str))
            return
        for key, value in fields.items():
            print(_tsv([key, value if isinstance(value, (str, int, float)) or value is None else json.dumps(value)]))
        for item in listed:
            print(json.dumps(item, ensure_ascii=False))
        return
    rows = [[k, v if isinstance(v, str) else json.dumps(v, indent=1 if k == "metrics" else None, ensure_ascii=False)]
            for k, v in fields.items() if k != "metrics"]
    rows.append(["metrics", _metrics_text(run["metrics"])])
    _print_table(["field", "value"], rows, title=f"run {run_id}")
    if listed:
        _print_table(["#", "template", "combination", "prediction / output", "gold"],
                     [[str(i["idx"]), i["template"], i["combo"], _cut(i["prediction"] or i["output"] or ""),
                       i["gold"] or ""] for i in listed])


def _metrics_text(metrics: object) -> str:
    """Metrics for people: eval results as one line per combination, without confusion matrices."""
    from llmlab.orchestration import report
    from llmlab.runs import runlog

    if not isinstance(metrics, dict) or not metrics:  # the JSON of the runs table's metrics column
        return ""
    lines = []
    for r in report.eval_results(metrics):
        values = r["metrics"] if isinstance(r["metrics"], dict) else {}
        shown = " ".join(f"{k} {v * 100:.1f}" for k, v in values.items() if isinstance(v, (int, float)))
        lines.append(f"{r['template']} shots={r['shots']} seed={r['seed']}{runlog.calibration_suffix(r.get('calibrate'))}: {shown}")
    lines += [f"{k}: {v}" for k, v in metrics.items() if k != "results"]
    return "\n".join(lines)


@runs_app.command("search")
def runs_search(text: Annotated[str, typer.Argument(help="Words to find in prompts, outputs and predictions.")],
                limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many items.")] = 50,
                json_out: Json = False) -> None:
    """Full-text search over every logged prompt and output, newest first."""
    from llmlab.runs import runlog

    found = runlog.search(_db(), text, limit)
    if json_out or not _tty():
        for item in found:
            print(json.dumps(item, ensure_ascii=False))
        return
    _print_table(["run", "command", "#", "combination", "prompt", "output / prediction"],
                 [[str(i["run_id"]), i["command"], str(i["idx"]), i["combo"], _around(i["prompt"] or "", text),
                   _around(i["output"] or i["prediction"] or "", text)] for i in found])


def _around(text: str, query: str, width: int = 50) -> str:
    """The part of `text` around the first word of `query` it contains (a search hit in context)."""
    flat = " ".join(text.split())
    hits = [flat.lower().find(w.lower()) for w in query.split()]
    at = min((h for h in hits if h >= 0), default=0)
    start = max(0, min(at - width // 3, len(flat) - width))
    return ("..." if start else "") + _cut(flat[start:], width)


def _metric_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Metrics side by side: a row per (combination, metric), a column per run."""
    from llmlab.orchestration import report

    table: dict[str, dict[int, str]] = {}
    for run in runs:
        several = len(run["templates"]) > 1
        for s in report.sweep([run]):
            template = s["label"].split(" ", 1)[1].removesuffix(" calibrated")
            for shots, mean, std, _ in s["points"]:
                name = f"{template + ' ' if several else ''}{plural(shots, 'shot')}{' calibrated' if s['calibrated'] else ''} {s['metric']}"
                table.setdefault(name, {})[run["id"]] = f"{mean * 100:.1f}" + (f" ± {std * 100:.1f}" if std else "")
        for k, v in (run["metrics"] or {}).items():
            if isinstance(v, (int, float)):
                table.setdefault(k, {})[run["id"]] = f"{v * 100:.1f}" if v <= 1 else f"{v:g}"
    headers = ["metric", *(f"#{r['id']} {', '.join(t['name'] for t in r['templates']) or r['model'] or ''}" for r in runs)]
    return headers, [[name, *(vals.get(r["id"], "") for r in runs)] for name, vals in table.items()]


@runs_app.command("compare")
def runs_compare(
    run_ids: Annotated[list[int], typer.Argument(help="Two or more run ids.")],
    show: Annotated[str, typer.Option(help="Items to list: differing (outputs or predictions differ), wrong, all.")] = "differing",
    format: Annotated[str, typer.Option("--format", "-f", help="auto (a table on a terminal, else JSONL), jsonl, csv.")] = "auto",
    baseline: Annotated[Optional[int], typer.Option(help="The run the others are compared with: paired "
                                                    "differences, 95% CI, Holm p.", show_default="the first")] = None,
) -> None:
    """Metrics side by side, then the inputs (matched by id, else position) whose outputs differ, and
    each run's paired difference from the baseline run on the inputs both have."""
    from llmlab.orchestration import compare
    from llmlab.runs import runlog

    if len(run_ids) < 2:
        raise UsageError("give two or more run ids to compare, e.g. llmlab runs compare 3 4")
    _check_choice("--show", show, ("all", "differing", "wrong"))
    _check_choice("--format", format, ("auto", "jsonl", "csv"))
    if baseline is not None and baseline not in run_ids:
        raise UsageError(f"--baseline {baseline} is not one of the compared runs ({', '.join(map(str, run_ids))})")
    db = _db()
    runs = [runlog.get_run(db, i) for i in run_ids]
    m = compare.matrix(runs, lambda i: runlog.items(db, i))
    rows = compare.select(m, show)
    if format == "auto" and _tty():
        _print_table(*_metric_rows(runs), title="metrics")
    console.note(f"{len(rows)} of {len(m.rows)} inputs {'shown' if show == 'all' else show}")
    chosen = compare.baseline_column(m, None if baseline is None else str(baseline), run_ids=True)
    _show_matrix(m, rows, format, paired=compare.paired(m, chosen))


@runs_app.command("export")
def runs_export(
    run_id: RunId,
    format: Annotated[str, typer.Option("--format", "-f", help="jsonl or csv. [default: from -o's extension, else jsonl]")] = "auto",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Every item of a run (prompt, output, prediction, probabilities, gold, ...), one record per line."""
    import csv

    from llmlab.runs import runlog

    _check_choice("--format", format, ("auto", "jsonl", "csv"))
    fmt = format if format != "auto" else ("csv" if output and output.lower().endswith(".csv") else "jsonl")
    check_output_path(output)  # a folder, a missing or read-only one: one line, before reading the log
    db = _db()
    runlog.get_run(db, run_id)
    listed = runlog.items(db, run_id)
    with written(output) as out:
        if fmt == "csv":
            names = ["run_id", "idx", "key", "template", "combo", "prompt", "output", "prediction", "gold",
                     "probabilities", "extra"]
            writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore")
            writer.writeheader()
            for item in listed:
                writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                                 for k, v in item.items()})
        else:
            for item in listed:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")


@runs_app.command("path")
def runs_path() -> None:
    """Where the run log is ($LLMLAB_HOME/runs.db, else ~/.local/share/llmlab/runs.db)."""
    from llmlab.runs import runlog

    print(runlog.db_path())


@runs_app.command("rm")
def runs_rm(run_ids: Annotated[list[int], typer.Argument(help="Run ids to delete, with their items.")],
            force: Annotated[bool, typer.Option("--force", help="Delete even a run still being written.")] = False,
            ) -> None:
    """Delete runs and their items."""
    from llmlab.runs import runlog

    from llmlab.runs.runquery import running

    db = _db(write=True)
    for run_id in run_ids:  # every id checked before anything is deleted
        run = runlog.get_run(db, run_id)
        if running(run) and not force:
            raise UsageError(f"run {run_id} is still running (pid {run['pid']}); wait for it to end, or stop it "
                             "first (or give --force)")
    for run_id in run_ids:
        runlog.delete(db, run_id)
        console.note(f"deleted run {run_id}")


def report_cmd(
    run_ids: Annotated[list[int], typer.Argument(help="Run ids (see `llmlab runs list`).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The HTML file to write.")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write the plots as PNG files in this folder.")] = None,
) -> None:
    """A self-contained HTML report of runs: curves, confusion matrices, the comparison.

    One HTML file (no network needed to open it): the shot-sweep curve, confusion matrices, the
    comparison matrix (filters all / differing / wrong) and each item's exact prompt on click."""
    from llmlab.orchestration import compare
    from llmlab.orchestration import report
    from llmlab.runs import runlog

    check_output_path(output)
    if png is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--png needs matplotlib: pip install 'llmlab[plots]' (or pip install matplotlib)")
    db = _db()
    runs = [runlog.get_run(db, i) for i in run_ids]
    m = compare.matrix(runs, lambda i: runlog.items(db, i))
    html = report.render(runs, m)
    with written(output) as out:  # a full disk leaves the previous report whole
        out.write(html)
    console.note(f"wrote {output}")
    for path in report.write_pngs(runs, png) if png is not None else []:
        console.note(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `report` and `runs` to the llmlab app."""
    app.command("report")(report_cmd)
    app.add_typer(runs_app, name="runs")
