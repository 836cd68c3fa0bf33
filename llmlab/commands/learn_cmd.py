"""Commands that show how a model works: tokenize, info, next, lab. `register(app)` adds them to
the main CLI. Only typer, rich and the standard library at import time (`llmlab --help` stays fast);
models load inside the commands."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmlab.commands.app import hooks, model_config
from llmlab.core import console
from llmlab.core.config import Backend, ChatMode, Dtype, value
from llmlab.core.jsontypes import JSONValue
from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from rich.console import Console

    from llmlab.core.config import ModelConfig
    from llmlab.io.items import Item
    from llmlab.learn.anatomy import Anatomy
    from llmlab.prompting.templates import Template
from llmlab.commands.options import (AdapterOpt, BackendOpt, DeviceMapOpt, MaxMemoryOpt, GEN_PANEL, IO_PANEL, MODEL_PANEL, PROMPT_PANEL, Chat, ConfigFile, Device, DtypeOpt,
                            Greedy, InputFile, Model, PromptsDir, Quiet, RepetitionPenalty, Seed, Server, Temperature,
                            TemplateOpt, TopK, TopP, Vars)

# Options these commands share with the others are declared once, in llmlab.commands.options; below, the ones
# that mean something else here (a different default, or choices of these commands only).
Shots = Annotated[int, typer.Option(rich_help_panel=PROMPT_PANEL, help="Demonstrations in the prompt (>= 0).")]
Format = Annotated[str, typer.Option("--format", "-f", rich_help_panel=IO_PANEL,
                                     help="auto (text on a terminal, JSONL when piped), jsonl, or text (the "
                                     "human view: tables, bars, coloured spans on a terminal).")]
TokenizeChat = Annotated[Optional[ChatMode], typer.Option(
    rich_help_panel=MODEL_PANEL, show_default="off for plain text; with a template, the template's, else auto",
    help="Wrap the text in the chat template: auto, on, off.")]
TextField = Annotated[str, typer.Option(rich_help_panel=IO_PANEL, help="Input field holding the text.")]


def _piped(format: str) -> bool:
    """True for JSONL: asked for, or auto off a terminal; False for the human view (text)."""
    if format not in ("auto", "jsonl", "text"):
        raise UsageError(f"invalid --format '{format}': choose auto, jsonl or text")
    return format == "jsonl" or (format == "auto" and not sys.stdout.isatty())


def _stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _text(text: Optional[str]) -> Optional[str]:
    """The argument, else piped stdin, else None."""
    if text is not None:
        return text
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.read()
    return data.rstrip("\n") if data.strip() else None


# ---------------------------------------------------------------- tokenize


def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="The text. Omit it to read stdin or use --input.")] = None,
    model: Model = None,
    chat: TokenizeChat = None,
    template: TemplateOpt = None,
    shots: Shots = 0,
    prompts_dir: PromptsDir = None,
    var: Vars = None,
    input: InputFile = None,
    field: TextField = "prompt",
    format: Format = "auto",
    quiet: Quiet = False,
) -> None:
    """Show the tokens a text becomes: their ids, coloured spans, and the count against the context window.

    With --template, the token budget of each part of the built prompt: instruction, each
    demonstration, the input, formatting, and the room left for new tokens. Loads only the tokenizer.
    """
    from llmlab.scoring import generation
    from llmlab.backends import models
    from llmlab.prompting import prompts
    from llmlab.learn import tokens

    console.configure(quiet, False)
    piped, chat_mode = _piped(format), value(chat)
    tmpl = prompts.find_template(template, prompts_dir or []) if template else None
    items = _tokenize_items(text, tmpl, var, input, field)
    tokenizer, window, encoder_decoder = models.load_tokenizer(model)
    out = _stdout()
    builder = None
    if tmpl is not None:
        from llmlab.core import settings as settings_mod

        gen = settings_mod.build(settings_mod.normalize_keys(tmpl.generation, f"template '{tmpl.name}'"))
        use = generation.use_chat(tokenizer, chat_mode or tmpl.chat or "auto")
        options = prompts.options_for(tmpl, shots, None, None, use, None, "drop-shots", gen.max_new_tokens)
        builder = prompts.make_builder(tmpl, tokenizer, window, options, None, input, encoder_decoder,
                                       on_warn=console.warn)
    use_chat = generation.use_chat(tokenizer, chat_mode or "off") if tmpl is None else None
    for item in items:
        budget = None
        if builder is not None:
            _, toks, budget = tokens.budget(builder, item, builder.options.max_new_tokens)
            for note in budget.notes:
                console.warn(note)
        else:
            plain = str(item.fields[field])
            shown = generation.chat_text(tokenizer, [{"role": "user", "content": plain}]) if use_chat else plain
            toks = tokens.tokenize(tokenizer, shown, add_special_tokens=not use_chat)
        limit = f" of the {window}-token context window ({len(toks) / window:.1%})" if window else ""
        summary = f"{len(toks)} tokens{limit} · tokenizer of {model or models.DEFAULT_MODEL}"
        if piped:
            for t in toks:
                print(json.dumps(tokens.record(t, item.index), ensure_ascii=False))
            console.note(tokens.budget_line(budget) if budget else f"{item.source}: {summary}")
            continue
        tokens.render(toks, out)
        out.print("\n" + summary, style="bold", markup=False)  # the model's name is user text
        if budget:
            tokens.render_budget(budget, out)


def _tokenize_items(text: Optional[str], tmpl: Optional[Template], var: Optional[list[str]], input: Optional[str],
                    field: str) -> list[Item]:
    """What `tokenize` shows: the rows of --input, else the argument (or stdin) as one item."""
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    if input is not None and (text is not None or var):
        raise UsageError("give either a TEXT argument (or --var) or --input FILE, not both")
    if input is not None:
        items = io.read_items(input, text_field=field if tmpl is None else tmpl.fields[0])
        if tmpl is not None:
            prompts.require_fields(items, tmpl)
        else:
            io.require_field(items, field)
        return items
    if tmpl is not None:
        return [_template_item(tmpl, _text(text), var)]
    found = _text(text)
    if found is None:
        raise UsageError('no text: run llmlab tokenize "some text", pipe it on stdin, or use --input FILE')
    return [io.Item(0, {field: found}, "the text")]


def _template_item(tmpl: Template, text: Optional[str], var: Optional[list[str]]) -> Item:
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    values: dict[str, JSONValue] = dict(prompts.parse_vars(var or []))
    if text is not None:
        missing = [f for f in tmpl.fields if f not in values]
        if len(missing) != 1:
            raise UsageError(f"template '{tmpl.name}' has fields {', '.join(tmpl.fields)}: give them with --var field=value")
        values[missing[0]] = text
    if not values:
        raise UsageError(f"no input for template '{tmpl.name}': give the text as an argument or --var "
                         f"{tmpl.fields[0]}=...")
    return io.Item(0, values, "--var")


# ---------------------------------------------------------------- info


def info(
    model: Annotated[Optional[str], typer.Argument(
        show_default="smollm2", help="A config.json file, a model folder, a .gguf file, an alias or a Hub id in the "
        "local cache. Only the config is read, never the weights.")] = None,
    format: Format = "auto",
    quiet: Quiet = False,
) -> None:
    """A model's anatomy from its config alone: architecture, parameters, shapes, and memory.

    Parameters are counted exactly by building the model on the meta device (shapes, no storage).
    The memory table gives the weights at fp32/bf16/int8/int4, the KV cache, and the training estimate.
    """
    from llmlab.learn import anatomy

    console.configure(quiet, False)
    piped = _piped(format)
    a = anatomy.inspect(model)
    if piped:
        print(json.dumps(a.to_json()))
        return
    _show_info(a, _stdout())


def _show_info(a: Anatomy, out: Console) -> None:
    from rich.table import Table

    from llmlab.learn.anatomy import CACHE_BYTES, DTYPE_BYTES, KINDS, TRAINING_EXTRA_BYTES, human, millions

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    chat = {True: "yes", False: "no", None: "unknown (no tokenizer)"}[a.chat_template]
    rows = [
        ("model", f"{a.name} ({a.model_type}, {a.model_class})"),
        ("architecture", f"{a.kind}: good for {KINDS[a.kind]}"),
        ("parameters", millions(a.parameters)),
        ("  embeddings", millions(a.embeddings) + (" (input and output share one matrix: counted once)" if a.tied
                                                   else " (input embeddings + a separate output head)")),
    ]
    rows += [(f"  {s.name}", f"{s.layers} layers x {s.per_layer:,} = {millions(s.total)}") for s in a.stacks]
    rows += [
        ("  other", f"{a.other:,} (final norms, biases)"),
        ("hidden size", str(a.hidden_size)),
        ("attention heads", f"{a.heads}" + (f" ({a.kv_heads} key/value heads: grouped-query attention)"
                                            if a.kv_heads != a.heads else "") + f", {a.head_dim} dims each"),
        ("vocabulary", f"{a.vocab_size:,} embedding rows" if a.vocab_size else "?"),
        ("context window", f"{a.window:,} tokens" if a.window else "unknown"),
        ("chat template", chat),
    ]
    for k, v in rows:
        facts.add_row(k, v)
    out.print(facts)
    memory = a.memory()
    table = Table("memory (1 GB = 10^9 bytes)", *DTYPE_BYTES, title="memory", title_justify="left")
    table.add_row("bytes per parameter", *(f"{b:g}" for b in DTYPE_BYTES.values()))
    table.add_row("weights", *(human(memory[d]["weights"]) for d in DTYPE_BYTES))
    if a.decoder_layers:
        what = "KV cache per token" + (" (decoder self-attention)" if a.kind == "encoder-decoder" else "")
        table.add_row(what, *(human(memory[d]["kv_per_token"]) for d in DTYPE_BYTES))
        if a.window:
            full = f"KV cache, full {a.window:,}-token window" + (" in + out" if a.kind == "encoder-decoder" else "")
            table.add_row(full, *(human(memory[d]["kv_full_window"]) for d in DTYPE_BYTES))
            table.add_row("weights + full KV cache", *(human(memory[d]["weights_plus_kv"]) for d in DTYPE_BYTES))
    out.print(table)
    if a.decoder_layers:
        out.print(f"KV cache per token = 2 (key, value) x {a.decoder_layers} layers x {a.kv_heads} heads x "
                  f"{a.head_dim} dims x bytes; int8/int4 quantize the weights only, the cache stays "
                  f"{CACHE_BYTES['int4']:g}-byte bf16.")
    else:
        out.print("An encoder-only model reads the input in one pass: no KV cache, it does not generate.")
    out.print(f"training (full fine-tuning with Adam, fp32): 4 bytes of weights + ~{TRAINING_EXTRA_BYTES} extra "
              f"per parameter (8 optimizer states, 4 gradients, ~8 activations and temporaries) = "
              f"[bold]{human(a.training_bytes())}[/bold], about 6x the fp32 weights.")
    for note in a.notes:
        out.print(f"note: {note}")


# ---------------------------------------------------------------- next


def next_token(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. Omit it to read stdin.")] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: DtypeOpt = Dtype.auto,
    chat: Chat = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    backend: BackendOpt = Backend.hf,
    adapter: AdapterOpt = None,
    steps: Annotated[int, typer.Option(rich_help_panel=GEN_PANEL, help="Tokens to walk, one distribution each (>= 1).")] = 1,
    show: Annotated[int, typer.Option(rich_help_panel=IO_PANEL, help="List the N most likely tokens (>= 1).")] = 10,
    greedy: Greedy = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    config: ConfigFile = None,
    format: Format = "auto",
    server: Server = None,
    quiet: Quiet = False,
) -> None:
    """The model's next-token distribution, and what temperature, top-k and top-p make of it.

    Lists the most likely next tokens with their probabilities (bars on a terminal, JSONL when piped),
    the reshaped distribution and which tokens are cut, and the token picked: greedy, or sampled with
    --sample/--seed. --steps K walks K tokens.
    """
    from llmlab.core import settings as settings_mod
    from llmlab.learn import nexttoken
    from llmlab.orchestration.session import Session
    from llmlab.scoring import generation

    console.configure(quiet, False)
    model_cfg = model_config(model, device, dtype, chat, device_map, max_memory, backend, adapter=adapter)
    piped = _piped(format)
    layers = [settings_mod.load_preset(config)] if config else []
    flags: dict[str, object] = dict(do_sample=None if greedy is None else not greedy, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    settings_mod.build(*layers, flags)  # checked here, before any work
    if steps < 1 or show < 1:
        raise UsageError(f"invalid --steps {steps} / --show {show}: both must be >= 1")
    text = _text(prompt)
    if text is None:
        raise UsageError('no prompt: run llmlab next "your prompt" or pipe one on stdin')
    if server:
        return _next_remote(server, model_cfg, text, {k: v for layer in [*layers, flags] for k, v in layer.items()
                                                      if v is not None}, steps, show, piped)
    lm = Session(model_cfg, hooks=hooks(True)).lm
    use_chat = generation.use_chat(lm.tokenizer, value(chat) or "auto")
    out = None if piped else _stdout()
    settings = settings_mod.build(*layers, flags)
    for step in nexttoken.walk(lm, generation.chat_text(lm.tokenizer, [{"role": "user", "content": text}])
                               if use_chat else text, use_chat, settings, steps, show):
        if piped or out is None:  # (out is None exactly when piped)
            print(json.dumps(step.to_json(), ensure_ascii=False), flush=True)
        else:
            nexttoken.render(step, out)


def _next_remote(server: str, model_cfg: ModelConfig, text: str, flags: dict[str, object], steps: int, show: int,
                 piped: bool) -> None:
    """next --server: the server walks the steps; shown here as in-process."""
    from llmlab.learn import nexttoken
    from llmlab.serving import client

    for data in client.next_steps(server, model_cfg, text, flags, steps, show):
        if piped:
            print(json.dumps(data, ensure_ascii=False), flush=True)
        else:
            nexttoken.render(nexttoken.Step.from_json(data), _stdout())


# ---------------------------------------------------------------- lab


def lab(
    model: Model = None,
    device: Device = "auto",
    dtype: DtypeOpt = Dtype.auto,
    chat: Chat = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    backend: BackendOpt = Backend.hf,
    adapter: AdapterOpt = None,
    template: TemplateOpt = None,
    shots: Shots = 0,
    prompts_dir: PromptsDir = None,
    config: ConfigFile = None,
    server: Server = None,
    quiet: Quiet = False,
) -> None:
    """An interactive session that keeps the model loaded: type a prompt, watch the completion stream.

    Commands: /set NAME VALUE (any generation setting), /template NAME|off, /shots N, /chat on|off|auto,
    /tokens, /next, /show (the exact prompt), /save preset.yaml, /help, /quit. Arrow keys recall history.
    Piped stdin runs the lines as a script.
    """
    from llmlab.learn import lab as lab_mod

    console.configure(quiet, False)
    model_cfg = model_config(model, device, dtype, chat, device_map, max_memory, backend, adapter=adapter)
    served = None
    if server:  # the served model: its tokenizer asked over HTTP, its completions and /next done there
        from llmlab.serving.remote import RemoteLM

        def served() -> tuple[RemoteLM, lab_mod.Walker]:
            remote = RemoteLM(server, model_cfg)
            return remote, remote.walk

    session = lab_mod.Session.start(model_cfg, template, shots, prompts_dir or [], config, hooks(True), served)
    session.run()


def register(app: typer.Typer) -> None:
    """Add tokenize, info, next and lab to the llmlab app."""
    app.command("tokenize")(tokenize)
    app.command("info")(info)
    app.command("next")(next_token)
    app.command("lab")(lab)
