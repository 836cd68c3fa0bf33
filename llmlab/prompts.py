"""Prompt templates (YAML files in prompts/) and the one prompt builder: instruction, zero-, one- or
few-shot demonstrations, chat formatting, and fitting the context window."""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llmlab.errors import ContextOverflowError, DataError, TemplateError, UsageError
from llmlab.io import Item

_QUERY_MARK = "\x00query\x00"
# The shipped templates: top-level prompts/ in a source checkout (and an editable install); a wheel
# carries the same files as package data, llmlab/_prompts (pyproject.toml maps prompts/ there).
SOURCE_DIR = Path(__file__).resolve().parent.parent / "prompts"
TASKS = ("generate", "classify")
SELECTIONS = ("first", "random", "balanced", "similar", "similar-tfidf", "similar-hidden")
# similar: the k pool examples nearest to the item (llmlab.retrieval); similar-<retriever> picks the
# measure, similar alone the one measured best (retrieval.DEFAULT).
SHOT_FORMATS = ("turns", "inline")
OVERFLOW_MODES = ("drop-shots", "truncate", "error")
KEYS = {
    "name", "description", "task", "instruction", "input", "target", "labels", "separator",
    "answer_prefix", "examples", "generation", "shot_format", "references", "chat",
    "shots", "calibrate", "shot_selection",  # measured defaults (prompts/README.md)
}


@dataclass
class Template:
    """A parsed template file. Placeholders are `{field}`; `{{` and `}}` are literal braces."""

    name: str
    path: Path | None
    task: str
    input: str
    description: str = ""
    instruction: str = ""
    target: str | None = None
    # labels: label value in the data -> the text the model sees/says (the verbalizer)
    labels: dict[str, str] = field(default_factory=dict)
    separator: str = "\n\n"  # between the instruction and each demonstration
    answer_prefix: str = " "  # between a demonstration's input and its answer (plain text only)
    examples: list[dict[str, Any]] = field(default_factory=list)
    examples_path: Path | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    shot_format: str | None = None  # default --shot-format for chat models
    chat: str | None = None  # default --chat (auto, on, off) for this template
    references: list[str] = field(default_factory=list)  # extra reference fields for eval
    shots: int | None = None  # default --shots
    calibrate: str | None = None  # default calibration method (classify.CALIBRATIONS)
    shot_selection: str | None = None  # default --shot-selection
    source_text: str = ""

    @property
    def fields(self) -> list[str]:
        return placeholders(self.input, f"template '{self.name}' input")

    def verbalize(self, value: Any) -> str:
        return self.labels.get(str(value), str(value)) if self.labels else str(value)


# ---------------------------------------------------------------- placeholders


def placeholders(text: str, where: str) -> list[str]:
    names = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][\w-]*", name) or spec or conversion:
            raise TemplateError(f"{where}: bad placeholder '{{{name}}}'; use {{field_name}}")
        if name not in names:
            names.append(name)
    return names


def fill(text: str, values: dict[str, Any], where: str) -> str:
    """Replace each {field} with values[field]; a missing one names the fields there are."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is None:
            continue
        if name not in values:
            known = ", ".join(values) or "none"
            raise DataError(f"{where}: no field '{name}' for the template (fields: {known})")
        value = values[name]
        out.append("" if value is None else str(value))
    return "".join(out)


# ---------------------------------------------------------------- loading


def builtin_dir() -> Path:
    """The shipped templates' folder: the installed package data, else the source tree's prompts/."""
    from importlib import resources

    packaged = resources.files("llmlab") / "_prompts"
    if packaged.is_dir():
        return Path(str(packaged))  # a wheel install: always a real folder in site-packages
    return SOURCE_DIR


def search_dirs(extra: Sequence[str] = ()) -> list[Path]:
    dirs = [Path(d) for d in extra]
    env = os.environ.get("LLMLAB_PROMPTS", "")
    dirs += [Path(d) for d in env.split(os.pathsep) if d]
    dirs.append(builtin_dir())
    return dirs


def scan_templates(extra: Sequence[str] = ()) -> tuple[list[Template], list[str]]:
    """(templates, problems): every template that loads, first of each name in search order, and one
    message per file that does not (a broken file never hides the others)."""
    found, seen, problems = [], set(), []
    for folder in search_dirs(extra):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            try:
                template = load_template(str(path))
            except TemplateError as exc:
                problems.append(f"skipped template {path}: {exc}")
                continue
            if template.name not in seen:
                seen.add(template.name)
                found.append(template)
    return found, problems


def list_templates(extra: Sequence[str] = ()) -> list[Template]:
    """The templates that load (see scan_templates for the files that don't)."""
    return scan_templates(extra)[0]


def find_template(name_or_path: str, extra: Sequence[str] = ()) -> Template:
    """A template by path, or by name (file stem or `name:`) in --prompts-dir, LLMLAB_PROMPTS, prompts/.
    A broken file is an error only when it is the one asked for."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_template(str(path))
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path:
        raise TemplateError(f"template file '{name_or_path}' not found")
    for folder in search_dirs(extra):
        for candidate in (folder / f"{name_or_path}.yaml", folder / f"{name_or_path}.yml"):
            if candidate.is_file():
                return load_template(str(candidate))
    found, _ = scan_templates(extra)
    for template in found:
        if template.name == name_or_path:
            return template
    names = ", ".join(t.name for t in found) or "none"
    raise TemplateError(f"no template named '{name_or_path}' (available: {names}); or pass a path to a .yaml file")


def load_template(path_text: str) -> Template:
    from llmlab.yamlfile import load_yaml_mapping

    path = Path(path_text)
    raw = load_yaml_mapping(path, "template")
    where = str(path)
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(KEYS))})")
    task = raw.get("task", "generate")
    if task not in TASKS:
        raise TemplateError(f"{where}: task must be generate or classify, not '{task}'")
    if not isinstance(raw.get("input"), str) or not raw["input"].strip():
        raise TemplateError(f"{where}: missing 'input', the per-item template, e.g. \"Review: {{text}}\\nSentiment:\"")
    for key in ("instruction", "separator", "answer_prefix", "description", "target", "name"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise TemplateError(f"{where}: '{key}' must be a string")
    labels = _labels(raw.get("labels"), where)
    if task == "classify" and len(labels) < 2:
        raise TemplateError(f"{where}: a classify template needs 'labels' (at least two)")
    if task == "classify" and not raw.get("target"):
        raise TemplateError(f"{where}: a classify template needs 'target', the field holding the label")
    generation = raw.get("generation") or {}
    if not isinstance(generation, dict):
        raise TemplateError(f"{where}: 'generation' must be a mapping of generation settings")
    shot_format = raw.get("shot_format")
    if shot_format is not None and shot_format not in SHOT_FORMATS:
        raise TemplateError(f"{where}: shot_format must be turns or inline, not '{shot_format}'")
    chat = raw.get("chat")
    if isinstance(chat, bool):  # YAML reads a bare on/off as a boolean
        chat = "on" if chat else "off"
    if chat is not None and chat not in ("auto", "on", "off"):
        raise TemplateError(f"{where}: chat must be auto, on or off, not '{chat}'")
    defaults = _defaults(raw, task, where)
    references = raw.get("references") or []
    if isinstance(references, str):
        references = [references]
    template = Template(
        name=raw.get("name") or path.stem,
        path=path,
        task=task,
        input=raw["input"],
        description=raw.get("description") or "",
        instruction=(raw.get("instruction") or "").strip(),
        target=raw.get("target"),
        labels=labels,
        separator=raw.get("separator", "\n\n"),
        answer_prefix=raw.get("answer_prefix", " "),
        generation=generation,
        shot_format=shot_format,
        chat=chat,
        references=list(references),
        **defaults,
        source_text=path.read_text(encoding="utf-8"),
    )
    template.fields  # placeholders are checked here
    placeholders(template.instruction, f"{where} instruction")
    examples = raw.get("examples") or []
    if isinstance(examples, str):
        template.examples_path = (path.parent / examples).resolve()
        examples = load_examples(str(template.examples_path))
    elif isinstance(examples, list):
        if not all(isinstance(e, dict) for e in examples):
            raise TemplateError(f"{where}: each entry of 'examples' must be a mapping of fields")
    else:
        raise TemplateError(f"{where}: 'examples' must be a list of mappings or a path to a JSONL/CSV file")
    template.examples = examples
    check_examples(template, examples, where)
    if template.shots and not examples:
        raise TemplateError(f"{where}: 'shots: {template.shots}' needs 'examples' to draw demonstrations from")
    return template


def _defaults(raw: dict[str, Any], task: str, where: str) -> dict[str, Any]:
    """The template's measured defaults (prompts/README.md), used when the user gives no flag:
    shots (a whole number >= 0), calibrate (a method, classify only), shot_selection."""
    shots, calibrate, selection = raw.get("shots"), raw.get("calibrate"), raw.get("shot_selection")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise TemplateError(f"{where}: 'shots' must be a whole number >= 0, not '{shots}'")
    if shots and not raw.get("target"):
        raise TemplateError(f"{where}: 'shots: {shots}' needs 'target', the field shown as each demonstration's answer")
    if isinstance(calibrate, bool):  # YAML reads a bare true/false (or on/off) as a boolean
        calibrate = "contextual" if calibrate else "off"
    if calibrate is not None and calibrate not in ("off", "contextual", "batch", "domain"):
        raise TemplateError(f"{where}: 'calibrate' must be off, contextual, batch or domain, not '{calibrate}'")
    if calibrate not in (None, "off") and task != "classify":
        raise TemplateError(f"{where}: 'calibrate' applies to classify templates only")
    if selection is not None and selection not in SELECTIONS:
        raise TemplateError(f"{where}: 'shot_selection' must be one of {', '.join(SELECTIONS)}, not '{selection}'")
    return {"shots": shots, "calibrate": calibrate, "shot_selection": selection}


def _labels(raw: Any, where: str) -> dict[str, str]:
    """label -> verbalizer. Each label once, each with its own non-empty text: two labels with the
    same text would always score the same (the first would always win)."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        pairs = [(v, v) for v in raw]
    elif isinstance(raw, dict):
        pairs = [(k, k if v is None else v) for k, v in raw.items()]
    else:
        raise TemplateError(f"{where}: 'labels' must be a list, or a mapping of label to verbalizer")
    labels: dict[str, str] = {}
    for label, text in pairs:
        if label is None or isinstance(label, (list, dict)) or isinstance(text, (list, dict)):
            raise TemplateError(f"{where}: each label (and its text) must be a string, not {label!r}")
        label, text = str(label), str(text)
        if label in labels:
            raise TemplateError(f"{where}: label '{label}' is listed twice; list each label once")
        if not text.strip():
            raise TemplateError(f"{where}: label '{label}' has an empty text; give it the word the model should say")
        same = next((other for other, t in labels.items() if t.strip() == text.strip()), None)
        if same is not None:
            raise TemplateError(f"{where}: labels '{same}' and '{label}' have the same text '{text.strip()}', so "
                                "they always score the same; give each label its own text")
        labels[label] = text
    return labels


def load_examples(path: str) -> list[dict[str, Any]]:
    from llmlab import io

    try:
        return [item.fields for item in io.read_items(path)]
    except DataError as exc:
        raise TemplateError(f"examples: {exc}") from None


def check_examples(template: Template, examples: list[dict[str, Any]], where: str) -> None:
    needed = template.fields + ([template.target] if template.target else [])
    for n, example in enumerate(examples, 1):
        missing = [f for f in needed if f not in example]
        if missing:
            raise TemplateError(
                f"{where}: example {n} has no field '{missing[0]}' (fields: {', '.join(example) or 'none'})"
            )
        bad = next((f for f in needed if example[f] is None or isinstance(example[f], (list, dict))), None)
        if bad:
            raise TemplateError(f"{where}: example {n} field '{bad}' is {json.dumps(example[bad])}, not text; "
                                "give it a string")
        if template.labels and str(example[template.target]) not in template.labels:
            raise TemplateError(
                f"{where}: example {n} has label '{example[template.target]}', not one of the "
                f"template's labels: {', '.join(template.labels)}"
            )


# ---------------------------------------------------------------- shot selection


def shot_order(size: int, selection: str, seed: int) -> list[int]:
    """The order a pool of `size` examples is drawn in: pool order for first (and similar, which
    ranks the pool per item instead), else a seeded shuffle."""
    if selection not in SELECTIONS:
        raise UsageError(f"invalid --shot-selection '{selection}': choose {', '.join(SELECTIONS)}")
    order = list(range(size))
    if selection not in ("first", "similar", "similar-tfidf", "similar-hidden"):
        random.Random(seed).shuffle(order)
    return order


def shots_note(template: Template, shots: int, available: int) -> str | None:
    """The warning for asking more shots than the pool can give (they are cut to what there is)."""
    if shots > available:
        return (f"--shots {shots}, but template '{template.name}' has only {available} examples to show: "
                f"using {available}")
    return None


def select_shots(template: Template, pool: Sequence[dict[str, Any]], shots: int, selection: str,
                 seed: int, exclude: set[int] = frozenset(), order: Sequence[int] | None = None) -> list[int]:
    """Indexes into `pool` of the demonstrations for one item, never one of `exclude`.

    first: pool order; random: a seeded shuffle; balanced: round-robin over the labels (in the
    template's label order) so classes are mixed, each label's examples in seeded order.
    The draw depends only on the seed, so items that exclude nothing share the same shots.
    `order` is shot_order(...) computed once by the caller; only as much of it is read as needed.
    """
    if order is None:
        order = shot_order(len(pool), selection, seed)
    if shots <= 0:
        return []
    candidates = (i for i in order if i not in exclude)
    if selection != "balanced":
        return [i for _, i in zip(range(shots), candidates)]
    if not template.target:
        raise UsageError(f"--shot-selection balanced needs a template with a 'target' field; '{template.name}' has none")
    groups: dict[str, list[int]] = {label: [] for label in template.labels or []}
    enough = -(-shots // len(groups)) if groups else None  # ceil: what round-robin takes per label at most
    for i in candidates:
        groups.setdefault(str(pool[i][template.target]), []).append(i)
        if enough and all(len(g) >= enough for g in groups.values()):
            break  # every label can give its share: the rest of the order can't change the pick
    chosen, queues = [], [g for g in groups.values() if g]
    while len(chosen) < shots and queues:
        for queue in list(queues):
            if len(chosen) == shots:
                break
            chosen.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return chosen


# ---------------------------------------------------------------- building


@dataclass
class BuildOptions:
    shots: int = 0
    selection: str = "first"
    seed: int = 0
    chat: bool = False
    shot_format: str = "turns"  # with chat: demonstrations as user/assistant turns, or inline in one turn
    overflow: str = "drop-shots"
    max_new_tokens: int = 0  # room to leave in the window (decoder-only models)
    pool_is_data: bool = False  # the examples are the input file itself: leave each item out
    calibrate: str = "off"  # classify: off or a calibration method (read by the caller, not the builder)


def options_for(template: Template, shots: int | None = None, selection: str | None = None, seed: int | None = None,
                chat: bool = False, shot_format: str | None = None, overflow: str = "drop-shots",
                max_new_tokens: int = 0, default_selection: str = "first",
                calibrate: str | None = None) -> BuildOptions:
    """BuildOptions with the template's defaults filled in where the caller passes None: the template's
    `shots:` (else 0) and `calibrate:` (else off), balanced shots for classify templates (else
    `default_selection`), seed 0, the template's shot format (else turns)."""
    return BuildOptions(
        shots=(template.shots or 0) if shots is None else shots,
        calibrate=(template.calibrate or "off") if calibrate is None else calibrate,
        selection=selection or template.shot_selection
        or ("balanced" if template.task == "classify" else default_selection),
        seed=0 if seed is None else seed,
        chat=chat,
        shot_format=shot_format or template.shot_format or "turns",
        overflow=overflow,
        max_new_tokens=max_new_tokens,
    )


@dataclass
class Prompt:
    """One built prompt: `text` exactly what the model sees; `plain` the same before any chat template."""

    text: str
    plain: str
    chat: bool
    answer_prefix: str  # put before a label when scoring it as the continuation
    shots: list[int]
    tokens: int
    notes: list[str] = field(default_factory=list)  # warnings: dropped shots, truncation
    # prefix: the start of `text` before the item's own input (instruction, demonstrations, chat
    # preamble): the same for every item with the same shots, so its computation can be shared.
    prefix: str = ""
    # ids: the tokenization of `text` that `tokens` counts (the one the model sees), or None.
    ids: list[int] | None = field(default=None, repr=False)

    @property
    def pieces(self) -> tuple[str, str]:
        return self.prefix, self.text[len(self.prefix) :]


class PromptBuilder:
    """Builds every prompt of a run: one code path for generate, classify, eval and render."""

    def __init__(self, template: Template, tokenizer: Any, window: int | None, options: BuildOptions,
                 pool: list[dict[str, Any]] | None = None, encoder_decoder: bool = False, lm: Any = None):
        if options.overflow not in OVERFLOW_MODES:
            raise UsageError(f"invalid --overflow '{options.overflow}': choose drop-shots, truncate or error")
        if options.shot_format not in SHOT_FORMATS:
            raise UsageError(f"invalid --shot-format '{options.shot_format}': choose turns or inline")
        if options.shots < 0:
            raise UsageError(f"invalid --shots {options.shots}: must be >= 0")
        self.template = template
        self.tokenizer = tokenizer
        self.window = window
        self.options = options
        self.pool = template.examples if pool is None else pool
        self.encoder_decoder = encoder_decoder
        self.lm = lm  # the loaded model, for similar-hidden (None where only the tokenizer is loaded)
        self._retriever: Any = None
        self._similar: dict[tuple[str, ...], list[int]] = {}  # item input -> its nearest pool rows
        if options.shots > 0 and not self.pool:
            raise TemplateError(
                f"template '{template.name}' has no examples, so --shots {options.shots} has nothing to show: "
                "add 'examples:' to the template or pass --examples FILE"
            )
        if options.shots > 0 and not template.target:
            raise TemplateError(f"template '{template.name}' has no 'target' field, so it can't show answers in shots")
        if options.shots > 0:
            check_examples(template, self.pool, "examples")
            note = shots_note(template, options.shots, len(self.pool) - int(options.pool_is_data))
            if note:
                from llmlab import console

                console.warn(note)
        # Computed once per run, not per item: the draw order and an index of the pool by input text.
        self._order = shot_order(len(self.pool), options.selection, options.seed)  # validates the selection
        self._orders = {0: self._order}  # --ensemble: the draw order of each extra draw, made when needed
        self._by_input: dict[tuple[str, ...], list[int]] = {}
        for i, example in enumerate(self.pool if options.shots > 0 else []):
            self._by_input.setdefault(self._input_key(example), []).append(i)

    # -- pieces

    def _item_input(self, values: dict[str, Any], where: str) -> str:
        return fill(self.template.input, values, where)

    def _demo(self, example: dict[str, Any]) -> tuple[str, str]:
        return self._item_input(example, "example"), self.template.verbalize(example[self.template.target])

    def _instruction(self, values: dict[str, Any], where: str) -> str:
        return fill(self.template.instruction, values, where) if self.template.instruction else ""

    def compose(self, values: dict[str, Any], shots: list[int], where: str,
                query: str | None = None) -> tuple[str, str]:
        """(model text, plain text) for an item with these demonstrations."""
        t = self.template
        demos = [self._demo(self.pool[i]) for i in shots]
        query = self._item_input(values, where) if query is None else query
        instruction = self._instruction(values, where)
        parts = ([instruction] if instruction else []) + [q + t.answer_prefix + a for q, a in demos] + [query]
        plain = t.separator.join(parts)
        if not self.options.chat:
            return plain, plain
        if self.options.shot_format == "inline" or not demos:
            messages = [{"role": "user", "content": plain}]
        else:
            messages = []
            for n, (q, a) in enumerate(demos):
                content = instruction + t.separator + q if n == 0 and instruction else q
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": query})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, plain

    def count(self, text: str) -> int:
        """Tokens of `text` as the model sees it; the ids of the last text counted are kept."""
        ids = list(self.tokenizer(text, add_special_tokens=not self.options.chat)["input_ids"])
        self._counted = (text, ids)
        return len(ids)

    def budget(self, extra_tokens: int = 0) -> int | None:
        """Tokens the prompt may use: the window, less room for new tokens on decoder-only models."""
        if self.window is None:
            return None
        room = 0 if self.encoder_decoder else self.options.max_new_tokens + extra_tokens
        return self.window - room

    # -- the whole prompt

    def exclusions(self, item: Item) -> set[int]:
        """Pool entries that are this item: the same row when the pool is the data, or equal inputs."""
        skip = {item.index} if self.options.pool_is_data and item.index < len(self.pool) else set()
        return skip | set(self._by_input.get(self._input_key(item.fields), ()))

    def _input_key(self, values: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(values.get(k)) for k in self.template.fields)

    # -- choosing the demonstrations

    @property
    def similar(self) -> bool:
        return self.options.selection.startswith("similar")

    def _retrieval_text(self, values: dict[str, Any]) -> str:
        return " ".join(self._input_key(values))

    def prepare(self, items: Sequence[Item]) -> None:
        """With similar selection, find the nearest pool rows of many items at once (one batched
        similarity computation instead of one per item); build() then only looks them up."""
        if not self.similar or self.options.shots <= 0:
            return
        from llmlab import retrieval

        if self._retriever is None:
            kind = self.options.selection.removeprefix("similar").lstrip("-") or retrieval.DEFAULT
            texts = [self._retrieval_text(e) for e in self.pool]
            self._retriever = retrieval.make_retriever(kind, texts, self.lm)
        todo = {self._input_key(i.fields): i for i in items if self._input_key(i.fields) not in self._similar}
        if not todo:
            return
        keys = list(todo)
        sims = self._retriever.similarities([" ".join(k) for k in keys])
        picked = retrieval.nearest(sims, self.options.shots, [self.exclusions(todo[k]) for k in keys])
        self._similar.update(zip(keys, picked))

    def choose_shots(self, item: Item, draw: int = 0) -> list[int]:
        """The demonstrations for one item in draw `draw` (--ensemble): draw d of random or balanced
        selection draws with seed + d; first and similar keep their set and shuffle its order."""
        o = self.options
        if self.similar and o.shots > 0:
            self.prepare([item])
            shots = list(self._similar[self._input_key(item.fields)])
        else:
            key = 0 if o.selection == "first" else draw  # first has one order, whatever the draw
            seed = o.seed + key
            if key not in self._orders:
                self._orders[key] = shot_order(len(self.pool), o.selection, seed)
            order = self._orders[key]
            shots = select_shots(self.template, self.pool, o.shots, o.selection, seed, self.exclusions(item), order)
        if draw and (self.similar or o.selection == "first"):
            random.Random(o.seed * 1000 + draw).shuffle(shots)  # another order of the same demonstrations
        return shots

    def build(self, item: Item, extra_tokens: int = 0, shots: list[int] | None = None, draw: int = 0) -> Prompt:
        """The prompt for one item; `shots` forces the demonstrations (for content-free inputs);
        `draw` picks another draw of demonstrations (--ensemble)."""
        o = self.options
        if shots is None:
            shots = self.choose_shots(item, draw)
        text, plain = self.compose(item.fields, shots, item.source)
        tokens = self.count(text)
        budget = self.budget(extra_tokens)
        notes: list[str] = []
        if budget is not None and tokens > budget:
            need = f"{tokens} tokens" + ("" if self.encoder_decoder else f" + {self.window - budget} new")
            if o.overflow == "error":
                raise ContextOverflowError(
                    f"{item.source}: the prompt needs {need}, over the model's {self.window}-token window; "
                    "use fewer --shots, a smaller --max-new-tokens, or --overflow drop-shots|truncate"
                )
            before = tokens
            if o.overflow == "drop-shots":
                kept = list(shots)
                while kept and tokens > budget:
                    kept.pop()
                    text, plain = self.compose(item.fields, kept, item.source)
                    tokens = self.count(text)
                if len(kept) < len(shots):
                    notes.append(f"{item.source}: prompt of {before} tokens did not fit the {self.window}-token "
                                 f"window; dropped {len(shots) - len(kept)} of {len(shots)} shots ({tokens} tokens now)")
                shots = kept
            if tokens > budget:
                text, plain, tokens, notes_ = self._truncate(item, shots, budget, tokens)
                notes += notes_
        marked, _ = self.compose(item.fields, shots, item.source, query=_QUERY_MARK)
        split = marked.index(_QUERY_MARK)
        if text[:split] != marked[:split]:
            split = 0  # the query changed text before it (a chat template that rewrites content)
        counted = getattr(self, "_counted", None)
        return Prompt(text, plain, o.chat, "" if o.chat else self.template.answer_prefix, shots, tokens,
                      notes, prefix=text[:split], ids=counted[1] if counted and counted[0] == text else None)

    def _truncate(self, item: Item, shots: list[int], budget: int, tokens: int) -> tuple[str, str, int, list[str]]:
        """Cut the item's longest field from the left until the prompt fits."""
        fields = [f for f in self.template.fields if isinstance(item.fields.get(f), str)]
        if not fields:
            raise ContextOverflowError(f"{item.source}: the prompt does not fit the {self.window}-token window "
                                       "and has no text field to shorten")
        name = max(fields, key=lambda f: len(item.fields[f]))
        ids = self.tokenizer(item.fields[name], add_special_tokens=False)["input_ids"]
        low, high, best = 0, len(ids), None
        while low <= high:  # the most tokens of the field's end that still fit
            keep = (low + high) // 2
            values = dict(item.fields, **{name: self.tokenizer.decode(ids[len(ids) - keep:]) if keep else ""})
            text, plain = self.compose(values, shots, item.source)
            count = self.count(text)
            if count <= budget:
                best, low = (text, plain, count, keep), keep + 1
            else:
                high = keep - 1
        if best is None:
            raise ContextOverflowError(f"{item.source}: even with '{name}' emptied the prompt exceeds the "
                                       f"{self.window}-token window; shorten the template or use fewer shots")
        text, plain, count, keep = best
        note = (f"{item.source}: prompt of {tokens} tokens did not fit the {self.window}-token window; "
                f"cut '{name}' from the left to its last {keep} of {len(ids)} tokens ({count} tokens now)")
        return text, plain, count, [note]


def make_builder(template: Template, tokenizer: Any, window: int | None, options: BuildOptions,
                 examples: str | None = None, input_path: str | None = None,
                 encoder_decoder: bool = False, lm: Any = None) -> PromptBuilder:
    """A builder whose pool is --examples FILE or the template's own examples; when that pool is the
    input file itself, each item is left out of its own demonstrations."""
    pool = None
    pool_path = template.examples_path
    if examples:
        pool = load_examples(examples)
        check_examples(template, pool, examples)
        pool_path = Path(examples).resolve()
    if input_path and input_path != "-" and pool_path is not None:
        options.pool_is_data = Path(input_path).resolve() == pool_path
    return PromptBuilder(template, tokenizer, window, options, pool, encoder_decoder, lm)


def model_view(tokenizer: Any, text: str) -> str:
    """The prompt as the model sees it: its token ids decoded back to text. It differs from `text` where
    the tokenizer normalises: T5's turns every newline and run of spaces into one space, and a character
    outside its vocabulary (`{`, `<`, `~`...) into <unk>."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def require_fields(items: Sequence[Item], template: Template) -> None:
    """Every placeholder of the template must be a field of every item (checked before any model time)."""
    for item in items:
        missing = [f for f in template.fields if f not in item.fields]
        if missing:
            raise DataError(f"{item.source}: no field '{missing[0]}' for template '{template.name}' "
                            f"(fields: {', '.join(item.fields) or 'none'})")
    from llmlab import io

    io.require_text(items, template.fields)  # null is an error, never the text "None"


def parse_vars(pairs: Sequence[str]) -> dict[str, str]:
    """--var field=value pairs into a mapping."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"invalid --var '{pair}': write it as field=value")
        values[name.strip()] = value
    return values
