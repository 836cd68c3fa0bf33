"""Prompt templates: the YAML files in prompts/ (and --prompts-dir, LLMLAB_PROMPTS), read, checked and
found by name; their examples pools; and the checks of input data against a template's fields."""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from llmlab.core.errors import DataError, TemplateError, UsageError
from llmlab.core.jsontypes import JSONObject, JSONValue
from llmlab.io.records import Item

_QUERY_MARK = "\x00query\x00"
# The shipped templates: top-level prompts/ in a source checkout (and an editable install); a wheel
# carries the same files as package data, llmlab/_prompts (pyproject.toml maps prompts/ there).
SOURCE_DIR = Path(__file__).resolve().parents[2] / "prompts"
TASKS = ("generate", "classify")
SELECTIONS = ("first", "random", "balanced", "similar", "similar-tfidf", "similar-hidden")
# similar: the k pool examples nearest to the item (llmlab.prompting.retrieval); similar-<retriever> picks the
# measure, similar alone the one measured best (retrieval.DEFAULT).
SHOT_FORMATS = ("turns", "inline")
OVERFLOW_MODES = ("drop-shots", "truncate", "error")
KEYS = {
    "name", "description", "task", "instruction", "input", "target", "labels", "separator",
    "answer_prefix", "examples", "generation", "shot_format", "references", "chat",
    "shots", "calibrate", "shot_selection", "probe",  # measured defaults (prompts/README.md)
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
    examples: list[JSONObject] = field(default_factory=list)
    examples_path: Path | None = None
    # examples: FILE outside the template's folder tree: not read, and this error where they are used
    # (unless --examples FILE replaces them); examples_read: False when loaded for a listing only
    examples_error: str | None = None
    examples_read: bool = True
    generation: JSONObject = field(default_factory=dict)
    shot_format: str | None = None  # default --shot-format for chat models
    chat: str | None = None  # default --chat (auto, on, off) for this template
    references: list[str] = field(default_factory=list)  # extra reference fields for eval
    shots: int | None = None  # default --shots
    calibrate: str | None = None  # default calibration method (classify.CALIBRATIONS)
    shot_selection: str | None = None  # default --shot-selection
    probe_path: Path | None = None  # probe: the default --probe-data (labelled rows) of --calibration probe
    source_text: str = ""

    @property
    def fields(self) -> list[str]:
        return placeholders(self.input, f"template '{self.name}' input")

    def verbalize(self, value: object) -> str:
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


def fill(text: str, values: Mapping[str, object], where: str) -> str:
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
    message per file that does not (a broken file never hides the others). Examples files are not
    read (a listing shows their file): load_template(t.path) reads them."""
    found, seen, problems = [], set(), []
    for folder in search_dirs(extra):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            try:
                template = load_template(str(path), read_examples=False)
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
            return load_template(str(template.path))
    names = ", ".join(t.name for t in found) or "none"
    raise TemplateError(f"no template named '{name_or_path}' (available: {names}); or pass a path to a .yaml file")


def load_template(path_text: str, read_examples: bool = True) -> Template:
    from llmlab.core.yamlfile import load_yaml_mapping

    path = Path(path_text)
    raw = load_yaml_mapping(path, "template")
    where = str(path)
    task = _check_keys(raw, where)
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
    chat = _chat(raw.get("chat"), where)
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
        shots=defaults[0], calibrate=defaults[1], shot_selection=defaults[2],
        source_text=path.read_text(encoding="utf-8"),
    )
    template.fields  # placeholders are checked here
    placeholders(template.instruction, f"{where} instruction")
    _attach_examples(template, raw.get("examples") or [], where, read_examples)
    _attach_probe(template, raw.get("probe"), where)
    return template


def _attach_probe(template: Template, probe: object, where: str) -> None:
    """probe: a JSONL/CSV file of labelled rows (fitted when used), or a probe fitted already (.npz,
    as optimize writes one), named relative to the template (read when used)."""
    if probe is not None:
        if not isinstance(probe, str) or template.task != "classify":
            raise TemplateError(f"{where}: 'probe' must be the path of a JSONL/CSV file of labelled rows or of a "
                                "fitted probe .npz (classify templates only)")
        template.probe_path = _beside(template, probe, where)
        if template.probe_path is None:
            raise TemplateError(f"{where}: probe file '{probe}' is outside the template's folder; move it beside "
                                "the template, or give it with --probe-data FILE")
        if not template.probe_path.is_file():
            raise TemplateError(f"{where}: probe file '{probe}' not found next to the template")
    if template.calibrate == "probe" and template.probe_path is None:
        raise TemplateError(f"{where}: 'calibrate: probe' needs 'probe', the labelled rows to fit it on")


def _check_keys(raw: Mapping[str, object], where: str) -> str:
    """No unknown key, a known task, an input, and text where text belongs; returns the task."""
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(KEYS))})")
    task = raw.get("task", "generate")
    if task not in TASKS:
        raise TemplateError(f"{where}: task must be generate or classify, not '{task}'")
    text = raw.get("input")
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"{where}: missing 'input', the per-item template, e.g. \"Review: {{text}}\\nSentiment:\"")
    for key in ("instruction", "separator", "answer_prefix", "description", "target", "name"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise TemplateError(f"{where}: '{key}' must be a string")
    return task


def _chat(chat: object, where: str) -> str | None:
    """The template's chat: auto, on, off or None (not said)."""
    if isinstance(chat, bool):  # YAML reads a bare on/off as a boolean
        chat = "on" if chat else "off"
    if chat is not None and chat not in ("auto", "on", "off"):
        raise TemplateError(f"{where}: chat must be auto, on or off, not '{chat}'")
    return chat


def _beside(template: Template, name: str, where: str) -> Path | None:
    """A file a template names, resolved relative to the template's own file; None when it lies outside
    the template's folder tree (a template names its own files, never /etc/passwd or ../../secrets)."""
    if template.path is None:
        raise TemplateError(f"{where}: '{name}' is relative to the template file, and this template has none")
    folder = template.path.parent.resolve()
    path = (folder / Path(name).expanduser()).resolve()
    return path if path.is_relative_to(folder) else None


def _attach_examples(template: Template, examples: JSONValue, where: str, read: bool = True) -> None:
    """The template's examples: a list of mappings, or a JSONL/CSV file named relative to it (inside
    its folder tree; read unless `read` is False)."""
    if isinstance(examples, str):
        template.examples_path = _beside(template, examples, where)
        if template.examples_path is None:
            template.examples_path = Path(examples)
            template.examples_error = (f"{where}: examples file '{examples}' is outside the template's folder; "
                                       "move it beside the template, or give it with --examples FILE")
            return
        if not read:
            template.examples_read = False
            return
        pool = load_examples(str(template.examples_path))
    elif isinstance(examples, list):
        pool = [e for e in examples if isinstance(e, dict)]
        if len(pool) != len(examples):
            raise TemplateError(f"{where}: each entry of 'examples' must be a mapping of fields")
    else:
        raise TemplateError(f"{where}: 'examples' must be a list of mappings or a path to a JSONL/CSV file")
    template.examples = pool
    check_examples(template, pool, where)
    if template.shots and not pool:
        raise TemplateError(f"{where}: 'shots: {template.shots}' needs 'examples' to draw demonstrations from")


def _defaults(raw: Mapping[str, object], task: str, where: str) -> tuple[int | None, str | None, str | None]:
    """The template's measured defaults (prompts/README.md), used when the user gives no flag:
    shots (a whole number >= 0), calibrate (a method, classify only), shot_selection."""
    shots, calibrate, selection = raw.get("shots"), raw.get("calibrate"), raw.get("shot_selection")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise TemplateError(f"{where}: 'shots' must be a whole number >= 0, not '{shots}'")
    if shots and not raw.get("target"):
        raise TemplateError(f"{where}: 'shots: {shots}' needs 'target', the field shown as each demonstration's answer")
    if isinstance(calibrate, bool):  # YAML reads a bare true/false (or on/off) as a boolean
        calibrate = "contextual" if calibrate else "off"
    if calibrate is not None and calibrate not in ("off", "contextual", "batch", "domain", "probe"):
        raise TemplateError(f"{where}: 'calibrate' must be off, contextual, batch, domain or probe, not '{calibrate}'")
    if calibrate not in (None, "off") and task != "classify":
        raise TemplateError(f"{where}: 'calibrate' applies to classify templates only")
    if selection is not None and selection not in SELECTIONS:
        raise TemplateError(f"{where}: 'shot_selection' must be one of {', '.join(SELECTIONS)}, not '{selection}'")
    return (shots if isinstance(shots, int) else None, calibrate if isinstance(calibrate, str) else None,
            selection if isinstance(selection, str) else None)


def _labels(raw: object, where: str) -> dict[str, str]:
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


# An examples file is read whole: more than this is not a demonstration pool (and /dev/zero never ends).
MAX_EXAMPLES_BYTES = 256 << 20


def load_examples(path: str) -> list[JSONObject]:
    """A demonstration pool: a regular JSONL/CSV file of at most MAX_EXAMPLES_BYTES."""
    import stat

    from llmlab.io import records as io

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TemplateError(f"examples file '{path}' not found") from None
    except OSError as exc:
        raise TemplateError(f"examples file '{path}': {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TemplateError(f"examples '{path}' is not a regular file (a folder, device or pipe); "
                            "give a JSONL or CSV file")
    if info.st_size > MAX_EXAMPLES_BYTES:
        raise TemplateError(f"examples file '{path}' is {info.st_size / 2**20:.0f} MiB, over the "
                            f"{MAX_EXAMPLES_BYTES >> 20} MiB limit of a demonstration pool; give a sample of it")
    try:
        return [item.fields for item in io.read_items(path)]
    except DataError as exc:
        raise TemplateError(f"examples: {exc}") from None


def check_examples(template: Template, examples: Sequence[Mapping[str, object]], where: str) -> None:
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
        if template.labels and template.target and str(example[template.target]) not in template.labels:
            raise TemplateError(
                f"{where}: example {n} has label '{example[template.target]}', not one of the "
                f"template's labels: {', '.join(template.labels)}"
            )


# ---------------------------------------------------------------- shot selection


def require_fields(items: Sequence[Item], template: Template) -> None:
    """Every placeholder of the template must be a field of every item (checked before any model time)."""
    for item in items:
        missing = [f for f in template.fields if f not in item.fields]
        if missing:
            raise DataError(f"{item.source}: no field '{missing[0]}' for template '{template.name}' "
                            f"(fields: {', '.join(item.fields) or 'none'})")
    from llmlab.io import records as io

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
