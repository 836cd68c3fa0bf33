"""The winning variant written as an ordinary template file: every key the template loader reads,
the demonstrations written in (shown first to last), and a comment with its lineage. The file is
loaded back and compared before it replaces anything, so what was measured is what is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from llmlab.core.errors import TemplateError
from llmlab.io.safewrite import replacing, write_text
from llmlab.prompting.templates import Template

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.io.items import Item
    from llmlab.scoring.probe import Probe
    import yaml

# the keys that decide the prompt and its reading, compared after loading the written file back
_SAME = ("task", "instruction", "input", "target", "labels", "separator", "answer_prefix", "examples", "chat",
         "shots", "calibrate", "shot_selection", "shot_format", "references", "generation", "probe_path")


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to the written file's folder when it is near (inside it or a sibling), else absolute."""
    rel = os.path.relpath(Path(path).resolve(), folder.resolve())
    return str(Path(path).resolve()) if rel.startswith(os.path.join("..", "..")) else rel


def _dumper() -> type[yaml.SafeDumper]:
    """safe_dump, with text that holds line breaks written in double quotes ("\\n"), as people write them."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = '"' if "\n" in value or value != value.strip() else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def template_mapping(t: Template, folder: Path, name: str) -> dict[str, object]:
    """The YAML mapping of template `t` written into `folder` (file paths made relative to it)."""
    fields = t.fields + ([t.target] if t.target else [])
    data: dict[str, object] = {"name": name, "description": t.description, "task": t.task}
    if t.instruction:
        data["instruction"] = t.instruction
    data["input"] = t.input
    if t.target:
        data["target"] = t.target
    if t.labels:
        data["labels"] = dict(t.labels)
    data["separator"] = t.separator
    data["answer_prefix"] = t.answer_prefix
    if t.examples_path is not None:
        data["examples"] = _relative(t.examples_path, folder)
    elif t.examples:
        data["examples"] = [{f: e[f] for f in fields if f in e} for e in t.examples]
    for key in ("chat", "shots", "calibrate", "shot_selection", "shot_format"):
        if getattr(t, key) is not None:
            data[key] = getattr(t, key)
    if t.probe_path is not None and t.calibrate == "probe":
        data["probe"] = _relative(t.probe_path, folder)
    if t.references:
        data["references"] = list(t.references)
    if t.generation:
        data["generation"] = dict(t.generation)
    return data


def write(t: Template, path: str, lineage: Sequence[str]) -> Template:
    """Write `t` to `path` (atomically) with `lineage` as its leading comment; returns it loaded back."""
    import yaml

    from llmlab.prompting.templates import load_template

    target = Path(path)
    data = template_mapping(t, target.parent, target.stem)
    examples = data.get("examples")
    if isinstance(examples, list):  # written in (not a file's path): every value as text
        data["examples"] = [{k: str(v) for k, v in e.items()} for e in examples]
    text = "".join(f"# {line}\n" for line in lineage)
    text += yaml.dump(data, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=1_000_000,
                      default_flow_style=False)
    written: list[Template] = []

    def check(tmp: str) -> None:  # the file as written must load back as the same template
        written.append(load_template(tmp))
        _check_same(t, written[0])

    write_text(path, text, check)
    loaded = written[0]
    loaded.path, loaded.name = target, target.stem
    return loaded


def beside(t: Template, path: str) -> Template:
    """`t` as a template written to `path` can read it (a template reads only files in its folder): an
    examples file elsewhere written in, a probe file elsewhere copied beside it as NAME.probe.jsonl."""
    import shutil
    from dataclasses import replace

    folder = Path(path).resolve().parent
    if t.examples_path is not None and not t.examples_path.resolve().is_relative_to(folder):
        t = replace(t, examples_path=None)  # its rows, already read, are written in
    if t.calibrate != "probe" or t.probe_path is None or t.probe_path.resolve().is_relative_to(folder):
        return t
    copy = Path(path).with_suffix(".probe.jsonl").resolve()
    shutil.copyfile(t.probe_path, copy)
    return replace(t, probe_path=copy)


def with_fitted(t: Template, probe: Probe, path: str) -> Template:
    """`t` reading `probe` as fitted: the probe saved (atomically) as NAME.probe.npz beside `path`."""
    from dataclasses import replace

    target = Path(path).with_suffix(".probe.npz").resolve()
    probe.save(target)
    return replace(t, probe_path=target)


def write_rows(items: Sequence[Item], path: Path | None) -> None:
    """The probe's rows (the search rows it was fitted on) as JSONL beside the template, atomically."""
    import json

    assert path is not None
    with replacing(str(path)) as f:
        f.writelines(json.dumps(dict(i.fields), ensure_ascii=False) + "\n" for i in items)


def _check_same(t: Template, loaded: Template) -> None:
    for key in _SAME:
        want, got = getattr(t, key), getattr(loaded, key)
        if key == "examples" and t.examples_path is None and got:  # written in: the shown fields, as text
            want = [{k: str(v) for k, v in e.items() if k in got[0]} for e in want]
        if key == "probe_path" and t.calibrate != "probe":
            continue
        if want != got:
            raise TemplateError(f"internal: the written template's '{key}' loads back as {got!r}, not {want!r}")
