"""Discovery commands: `llmlab prompt list|show|render` and `llmlab models`."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmlab.core import console
from llmlab.commands.app import hooks, model_config, prompt_config
from llmlab.core.config import InputFormat, Overflow, value
from llmlab.core.errors import UsageError
from llmlab.commands.options import (IO_PANEL, Chat, Examples, InputFile, InputFormatOpt, Limit, MaxNewTokens, Model,
                            Offset, OverflowOpt, PromptsDir, Quiet, ShotFormatOpt, Shots, ShotSeed, ShotSelection,
                            Vars, Verbose)

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.prompting.templates import Template

prompt_app = typer.Typer(help="Prompt templates: list them, show one, render the exact prompts.",
                         no_args_is_help=True)

ListFormat = Annotated[str, typer.Option("--format", "-f", help="auto (a table on a terminal), text "
                                         "(tab-separated), jsonl.")]


def _list_format(fmt: str) -> str:
    if fmt not in ("auto", "text", "jsonl"):
        raise UsageError(f"invalid --format '{fmt}': choose auto, text or jsonl")
    return fmt


@prompt_app.command("list")
def prompt_list(prompts_dir: PromptsDir = None, format: ListFormat = "auto") -> None:
    """List the templates in prompts/, --prompts-dir and LLMLAB_PROMPTS: name, task, description."""
    from llmlab.core import config
    from llmlab.prompting import prompts
    from llmlab.io import render

    fmt = _list_format(format)
    config.check_prompts_dirs(list(prompts_dir or []))
    found, problems = prompts.scan_templates(prompts_dir or [])
    found = sorted(found, key=lambda t: t.name)  # stable: a name in several folders keeps the search order
    for problem in problems:  # a broken file is named on stderr; it never hides the others
        console.warn(problem)
    # a listing reads no examples file: it names the file (examples_file) instead of counting its rows
    def examples(t: Template) -> str:
        return t.examples_path.name if t.examples_path else str(len(t.examples))

    if fmt == "jsonl":
        for t in found:
            print(json.dumps({"name": t.name, "task": t.task,
                              "examples": None if t.examples_path else len(t.examples),
                              "examples_file": str(t.examples_path) if t.examples_path else None,
                              "description": t.description, "path": str(t.path)}))
    elif fmt == "auto" and console.stdout_is_terminal():
        render.show(["name", "task", "examples", "description", "file"],
                    [[t.name, t.task, examples(t), t.description, str(t.path)] for t in found])
    else:
        for t in found:
            print(f"{t.name}\t{t.task}\t{t.description}")


@prompt_app.command("show")
def prompt_show(
    template: Annotated[str, typer.Argument(help="Template name (see `llmlab prompt list`) or .yaml path.",
                                            show_default=False)],
    prompts_dir: PromptsDir = None,
) -> None:
    """Show a template: its file, fields, labels, example pool and defaults, then its source."""
    from llmlab.orchestration import prompt_render, session
    from llmlab.core.config import PromptConfig

    tmpl = session.required_template(PromptConfig(template, prompts_dir=list(prompts_dir or [])))
    rows = prompt_render.template_info(tmpl)
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k.ljust(width)}  {v}\n" for k, v in rows))
    sys.stdout.write("\n" + tmpl.source_text.rstrip("\n") + "\n")


@prompt_app.command("render")
def prompt_render(
    template: Annotated[str, typer.Argument(help="Template name (see `llmlab prompt list`) or .yaml path.",
                                            show_default=False)],
    input: InputFile = None,
    input_format: InputFormatOpt = InputFormat.auto,
    offset: Offset = 0,
    limit: Limit = None,
    var: Vars = None,
    shots: Shots = None,
    shot_selection: ShotSelection = None,
    seed: ShotSeed = None,
    shot_format: ShotFormatOpt = None,
    overflow: OverflowOpt = Overflow.drop_shots,
    examples: Examples = None,
    prompts_dir: PromptsDir = None,
    model: Model = None,
    chat: Chat = None,
    max_new_tokens: MaxNewTokens = None,
    format: Annotated[str, typer.Option("--format", "-f", rich_help_panel=IO_PANEL,
                                        help="text (prompts separated by a line of dashes) or jsonl (records with "
                                        "templated: true when the chat template was applied; generate --input "
                                        "sends those as they are).")] = "text",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Print the exact prompt(s) the model would see, chat template included.

    Token counts go to stderr: one line for a single prompt (each prompt with -v), else a summary.
    Loads only the tokenizer, never the weights.
    """
    from llmlab.orchestration import prompt_render
    from llmlab.io import render
    from llmlab.core.config import InputConfig, RenderConfig

    console.configure(quiet, False)
    if format not in ("text", "jsonl"):
        raise UsageError(f"invalid --format '{format}': choose text or jsonl")
    cfg = RenderConfig(model_config(model, "auto", "auto", chat),
                       prompt_config(template, shots, shot_selection, seed, shot_format, overflow, examples, prompts_dir,
                               var),
                       InputConfig(input, value(input_format), "text", offset, limit), format, max_new_tokens, verbose)
    run = prompt_render.render(cfg, hooks())
    of = f" of {run.window}" if run.window else ""
    counts = []
    for n, r in enumerate(run.prompts):
        counts.append(r.prompt.tokens)
        if n == 0 and r.seen != r.prompt.text:
            console.note(f"shown as the model sees it: {model or 'the model'}'s tokenizer normalises the template "
                         "text (e.g. newlines become spaces)")
        if input is None or verbose:
            console.note(f"{r.item.source}: {r.prompt.tokens} tokens{of} ({render.plural(len(r.prompt.shots), 'shot')})")
        if format == "jsonl":
            print(json.dumps(prompt_render.render_record(r), ensure_ascii=False), flush=True)
        else:
            print(("-" * 40 + "\n" if n else "") + r.seen, flush=True)
    if input is not None and not verbose and counts:
        console.note(render.token_summary(counts, run.window, run.budget))


def models_cmd(
    format: Annotated[str, typer.Option("--format", "-f", help="auto (a table on a terminal), text "
                                        "(tab-separated), jsonl.")] = "auto",
    clean: Annotated[bool, typer.Option("--clean", help="First remove what stopped conversions left in "
                                        "LLMLAB_CACHE (never a conversion still running).")] = False,
    adapters: Annotated[Optional[str], typer.Option("--adapters", show_default="none",
                                                    help="Also list the adapters (`llmlab tune` folders) found "
                                                    "anywhere under this folder, as BASE+DIR models.")] = None,
) -> None:
    """List models: aliases, the embedded smollm2, llmlab's cache and the Hugging Face cache.

    With sizes on disk and whether each runs offline. Converted GGUF copies live in LLMLAB_CACHE.
    """
    from llmlab.backends import catalog, modelcache
    from llmlab.io import render

    fmt = _list_format(format)
    for path in modelcache.remove_stale() if clean else []:
        console.note(f"removed {path}")
    found = catalog.cached_models() + _adapter_models(adapters)
    if fmt == "jsonl":
        for m in found:
            print(json.dumps({"name": m.name, "kind": m.source, "size": m.size, "offline": m.offline,
                              "where": m.path or m.note, "note": m.note}))
        return
    rows = [[m.name, m.source, render.size_text(m.size), "yes" if m.offline else "no", m.path or m.note]
            for m in found]
    if fmt == "auto":
        render.show(["model", "kind", "size", "offline", "where"], rows)
    else:
        sys.stdout.write("".join("\t".join(r) + "\n" for r in rows))


def _adapter_models(folder: Optional[str]) -> list:
    """`models --adapters DIR`: each adapter under DIR as a model row (BASE+DIR, its method, size)."""
    if folder is None:
        return []
    from pathlib import Path
    from types import SimpleNamespace

    from llmlab.backends import adapters
    from llmlab.core.errors import UsageError

    if not Path(folder).is_dir():
        raise UsageError(f"--adapters '{folder}' is not a folder; give the folder your adapters are in")
    rows = []
    for path, record in adapters.find(folder):
        accuracy = record.get("held_out_accuracy")
        note = (f"{record.get('method')} adapter, template {record.get('template')}, k {record.get('k')}"
                + (f", held-out {accuracy:.1%}" if isinstance(accuracy, (int, float)) else ""))
        rows.append(SimpleNamespace(name=f"{record.get('base')}+{path}", source="adapter",
                                    size=adapters.size_bytes(path), offline=True, path=str(path), note=note))
    return rows


def register(app: typer.Typer) -> None:
    """Add `prompt list|show|render` and `models` to the llmlab app."""
    app.add_typer(prompt_app, name="prompt")
    app.command("models")(models_cmd)
