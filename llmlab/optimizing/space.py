"""What `llmlab optimize` searches: a Variant is one choice on each axis (instruction, label words,
demonstrations, format, readout), turned into an ordinary Template by `apply`, so it is scored by
the same path as any template and written as one. The candidates are the start template, its
one-axis neighbours and seeded random combinations."""

from __future__ import annotations

import itertools
import random
import re
import string
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from llmlab.core.jsontypes import JSONObject

from pathlib import Path

from llmlab.prompting.templates import Template

SHOT_COUNTS = (0, 1, 2, 4, 8)
DRAWS = 3  # demonstration draws (which rows) per shot count; each also in a shuffled order
FORMATS = ("as written", "lowercase", "uppercase", "dash", "value on its own line", "one line", "generic names")
SEPARATORS = ("\n\n", "\n", "\n\n###\n\n")
READOUTS = ("off", "contextual", "domain")  # plus probe when the template names probe rows
DATA_PROBE = "probe data"  # a probe fitted on search rows set aside for it (optimize --probe-rows)


@dataclass(frozen=True)
class Variant:
    """One point of the space. start=True: the template exactly as written, with its own defaults."""

    instruction: str  # a key of the candidate instructions: template, none, written N, proposed N
    labels: str  # a key of the label word sets: template, lowercase, uppercase, names
    demos: tuple[int, ...]  # pool rows shown, in order
    format: str  # one of FORMATS
    separator: str
    readout: str  # calibration method (classify)
    start: bool = False

    def describe(self, base: "Variant") -> str:
        """What differs from `base`, in a few words."""
        if self.start:
            return "the start template"
        parts = []
        for name in ("instruction", "labels", "format", "readout"):
            if getattr(self, name) != getattr(base, name):
                parts.append(f"{name} {getattr(self, name)}")
        if self.demos != base.demos:
            parts.append(f"{len(self.demos)} shots {list(self.demos)}")
        if self.separator != base.separator:
            parts.append(f"separator {self.separator!r}")
        return ", ".join(parts) or "the start template's choices, demonstrations written in"


@dataclass
class Space:
    """The axes' values for one template."""

    template: Template
    pool: list[JSONObject]
    instructions: dict[str, str]  # key -> text (written ones already filled with the template's labels)
    label_sets: dict[str, dict[str, str]]
    demo_sets: list[tuple[int, ...]]
    readouts: tuple[str, ...]
    start_demos: tuple[int, ...]
    data_probe: Path | None = None  # the file the "probe data" readout's rows are written to

    def start(self) -> Variant:
        t = self.template
        readout = (t.calibrate or "off") if t.task == "classify" else "off"
        return Variant("template", "template", self.start_demos, "as written", t.separator, readout, start=True)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _literals(text: str, change) -> str:
    """`text` with change(literal) applied to every stretch outside the {placeholders}."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(_escape(change(literal)))
        if name is not None:
            out.append("{" + name + "}")
    return "".join(out)


def _generic_names(text: str) -> str:
    """The first 'Word:' becomes 'Input:', the last one 'Answer:'."""
    names = re.findall(r"[A-Za-z][\w ]*?:", text)
    if not names:
        return text
    text = text.replace(names[0], "Input:", 1)
    if len(names) > 1:
        head, sep, tail = text.rpartition(names[-1])
        text = head + "Answer:" + tail
    return text


_FORMAT_CHANGES = {
    "as written": lambda s: s,
    "lowercase": str.lower,
    "uppercase": str.upper,
    "dash": lambda s: s.replace(": ", " - ").replace(":\n", " -\n"),
    "value on its own line": lambda s: s.replace(": ", ":\n"),
    "one line": lambda s: s.replace("\n", " "),
}


def formatted_input(text: str, fmt: str) -> str:
    """A template's input in format `fmt` (only the text around its {placeholders} changes)."""
    if fmt == "generic names":
        return _generic_names(text)
    return _literals(text, _FORMAT_CHANGES[fmt])


def apply(space: Space, v: Variant, name: str | None = None) -> Template:
    """The template that variant `v` is: the start template itself, or a copy with the variant's
    instruction, label words, input format, separator, demonstrations (written in, shown first to
    last) and calibration."""
    t = space.template
    if v.start:
        return t
    classify = t.task == "classify"
    probe_path = space.data_probe if v.readout == DATA_PROBE else t.probe_path
    return replace(
        t, name=name or t.name, path=None, source_text="",
        instruction=space.instructions[v.instruction], labels=dict(space.label_sets[v.labels]),
        input=formatted_input(t.input, v.format), separator=v.separator,
        examples=[space.pool[i] for i in v.demos], examples_path=None, shots=len(v.demos),
        shot_selection="first", calibrate=(calibration(v) if classify else None), probe_path=probe_path,
    )


def calibration(v: Variant) -> str:
    """The calibration method a variant's readout is (both probe readouts are the probe)."""
    return "probe" if v.readout == DATA_PROBE else v.readout


# ---------------------------------------------------------------- the axes


def written_instructions(t: Template) -> dict[str, str]:
    """The template's own, none, and instructions written here from the label words."""
    found = {"template": t.instruction, "none": ""}
    if t.task == "classify":
        words = [w.strip() for w in t.labels.values()]
        either = ", ".join(words[:-1]) + " or " + words[-1]
        found["written 1"] = _escape(f"Answer with one word: {either}.")
        found["written 2"] = _escape(f"Read the text and decide: is it {either}?")
        if t.instruction:
            found["written 3"] = t.instruction + _escape(f" Answer {either} only.")
    elif t.instruction:
        found["written 1"] = t.instruction + " Be brief."
    return found


def label_sets(t: Template) -> dict[str, dict[str, str]]:
    """The template's label words, lowercased, uppercased and the label names (distinct sets only)."""
    if t.task != "classify":
        return {"template": {}}
    candidates = {
        "template": dict(t.labels),
        "lowercase": {k: v.lower() for k, v in t.labels.items()},
        "uppercase": {k: v.upper() for k, v in t.labels.items()},
        "names": {k: k for k in t.labels},
    }
    out: dict[str, dict[str, str]] = {}
    for key, words in candidates.items():
        distinct = len({w.strip().lower() for w in words.values()}) == len(words)
        if distinct and words not in out.values():
            out[key] = words
    return out


def demo_sets(t: Template, pool: Sequence[Mapping[str, object]], start_shots: int) -> list[tuple[int, ...]]:
    """Demonstration lists: each shot count (up to the pool), DRAWS draws of which rows, each as
    drawn and shuffled."""
    from llmlab.prompting.prompts import select_shots

    selection = "balanced" if t.task == "classify" and t.target else "random"
    counts = sorted({k for k in (*SHOT_COUNTS, start_shots) if k <= len(pool)})
    sets: list[tuple[int, ...]] = []
    for k in counts:
        for draw in range(DRAWS if k else 1):
            picked = select_shots(t, pool, k, selection, draw)
            shuffled = list(picked)
            random.Random(1000 + draw).shuffle(shuffled)
            for demos in (tuple(picked), tuple(shuffled)):
                if demos not in sets:
                    sets.append(demos)
    return sets


def make_space(t: Template, pool: list[JSONObject], proposed: Sequence[str] = (),
               data_probe: Path | None = None) -> Space:
    from llmlab.prompting.prompts import options_for, select_shots

    opts = options_for(t)
    start = tuple(select_shots(t, pool, opts.shots, opts.selection, opts.seed)) if pool else ()
    instructions = written_instructions(t)
    for n, text in enumerate(proposed, 1):
        instructions[f"proposed {n}"] = _escape(text)
    readouts = READOUTS + (("probe",) if t.task == "classify" and t.probe_path else ())
    readouts += (DATA_PROBE,) if t.task == "classify" and data_probe is not None else ()
    if t.task != "classify":
        readouts = ("off",)
    return Space(t, pool, instructions, label_sets(t), demo_sets(t, pool, len(start)) or [()], readouts, start,
                 data_probe if DATA_PROBE in readouts else None)


def _axes(space: Space) -> dict[str, list[Any]]:
    return {"instruction": list(space.instructions), "labels": list(space.label_sets), "demos": space.demo_sets,
            "format": [f for f in FORMATS if formatted_input(space.template.input, f) != space.template.input
                       or f == "as written"],
            "separator": list(dict.fromkeys((space.template.separator, *SEPARATORS))),
            "readout": list(space.readouts)}


def _changed_axes(base: Variant, v: Variant) -> list[str]:
    return [axis for axis in ("instruction", "labels", "demos", "format", "separator", "readout")
            if getattr(v, axis) != getattr(base, axis)]


def candidates(space: Space, count: int, seed: int) -> list[Variant]:
    """`count` distinct variants: the start template first, then (seeded) half one-axis
    neighbours of it, half random combinations of every axis."""
    rng = random.Random(seed)
    start = space.start()
    base = replace(start, start=False)
    axes = _axes(space)
    per_axis = []
    for axis, values in axes.items():
        changed = [replace(base, **{axis: value}) for value in values if value != getattr(base, axis)]
        rng.shuffle(changed)
        per_axis.append(changed)
    rng.shuffle(per_axis)  # round-robin over the axes: a long axis (demonstrations) can't crowd out the rest
    # every other readout first: few values, and the axis that moved accuracy most where measured
    readouts = [v for changed in per_axis for v in changed if _changed_axes(base, v) == ["readout"]]
    neighbours = readouts + [v for row in itertools.zip_longest(*per_axis) for v in row
                             if v is not None and v not in readouts]
    chosen = [start] + neighbours[: max(0, count // 2 - 1)]
    seen = set(chosen) | {base}
    tries = 0
    while len(chosen) < count and tries < 50 * count:
        tries += 1
        v = Variant(**{axis: rng.choice(values) for axis, values in axes.items()})
        if v not in seen:
            seen.add(v)
            chosen.append(v)
    for v in neighbours[max(0, count // 2 - 1):]:  # a small space: fill up with the other neighbours
        if len(chosen) >= count:
            break
        if v not in seen:
            seen.add(v)
            chosen.append(v)
    return chosen
