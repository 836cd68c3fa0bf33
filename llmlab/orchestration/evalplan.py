"""The plan of `llmlab eval`: tasks (a template and its labeled data) x shot counts x seeds x
calibration, parsed from options or a --plan file, and the data checked before any model time."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from llmlab.core.config import EvalConfig, ProbeConfig, PromptConfig
from llmlab.core.errors import DataError, UsageError
from llmlab.io.records import Item
from llmlab.orchestration import resolve

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.prompting.templates import Template
    from llmlab.scoring.probe import Source

# ---------------------------------------------------------------- the plan


@dataclass
class Combo:
    task: "EvalTask"
    shots: int
    calibrate: str  # off or a calibration method (classify.CALIBRATIONS)
    seeds: list[int]
    sources: dict[str, str] = field(default_factory=dict)  # shots/calibrate -> flag, template or default

    @property
    def template(self) -> Template:
        return self.task.template


@dataclass
class EvalTask:
    """One template and the labeled data it is measured on."""

    template: Template
    data: str  # the data file's path ("-" = stdin)
    items: list[Item]
    refs: list[str] = field(default_factory=list)  # reference fields (generate templates)


@dataclass
class EvalPlan:
    """Everything `llmlab eval` runs: each task x shot count x seed x calibration."""

    tasks: list[EvalTask]
    shots: Optional[str] = None  # --shots: counts like 0,1,4 (None: each template's shots:, else 0)
    seeds: int = 1  # demonstration draws per shot count (seeds 0..N-1)
    calibration: Optional[str] = None  # --calibration: a comma list of methods (None: each template's calibrate:)
    method: str = "score"
    normalize: str = "none"
    batch_size: Optional[int] = 16
    prompt: PromptConfig = field(default_factory=PromptConfig)  # selection, format, overflow, examples
    max_new_tokens: Optional[int] = None
    log_samples: bool = False
    references: list[str] = field(default_factory=list)
    offset: int = 0
    limit: Optional[int] = None
    ensemble: int = 1  # demonstration draws whose label probabilities are averaged (classify)
    sample: Optional[int] = None  # --sample N: a seeded sample of N rows, before offset/limit
    sample_seed: int = 0
    probe: Optional[ProbeConfig] = None  # --probe-data etc.: what --calibration probe fits on
    adapters: list[str] = field(default_factory=list)  # --adapter a,b: a row per adapter beside the others
    _sources: dict[str, Source] = field(default_factory=dict, repr=False)  # template name -> probe.Source

    def combos(self) -> list[Combo]:
        return plan(self.tasks, self.shots, self.seeds, self.calibration, self.method,
                    self.probe.data if self.probe else None)

    def probe_sources(self) -> dict[str, Source]:
        """Each classify template's probe rows, read and checked once, before any model time
        (empty when the plan has no probe)."""
        from llmlab.orchestration.session import probe_source

        if not self._sources:
            for task in self.tasks:
                if task.template.task == "classify" and task.template.name not in self._sources:
                    modes = [c.calibrate for c in self.combos() if c.task is task]
                    source = probe_source(self.probe, modes, task.template)
                    if source is not None:
                        self._sources[task.template.name] = source
        return self._sources

    def total(self) -> int:
        """Items this process scores over the whole run (all of them when it runs alone): the
        progress bar's total."""
        from llmlab.orchestration.parallel import share_count

        return sum(share_count(len(c.task.items)) * len(c.seeds) for c in self.combos())


def plan(tasks: Sequence[EvalTask], shots: Optional[str], seeds: int, calibration: Optional[str], method: str,
         probe_data: Optional[str] = None) -> list[Combo]:
    """Every combination, each template's defaults resolved by the one rule (orchestration.resolve);
    zero-shot needs one seed only (no demonstrations to draw)."""
    if seeds < 1:
        raise UsageError(f"invalid --seeds {seeds}: must be >= 1")
    combos = []
    for task in tasks:
        modes = resolve.calibrations(calibration, task.template, method, probe_data)
        for n in resolve.shot_counts(shots, task.template):
            for mode in modes:
                combos.append(Combo(task, n.value, mode.value, list(range(seeds)) if n.value else [0],
                                    {"shots": n.source, "calibrate": mode.source}))
    return combos


def parse_task(spec: str, default_data: Optional[str]) -> tuple[str, str]:
    """-t NAME or -t NAME=DATA: a template and the data file it is measured on."""
    name, sep, data = spec.partition("=")
    if sep and data.strip():
        return name.strip(), data.strip()
    if default_data is None:
        raise UsageError(f"template '{name}' has no data: give --data FILE, or -t {name}=FILE")
    return name.strip(), default_data


def load_plan_file(path: str) -> list[tuple[str, str]]:
    """--plan FILE: a YAML mapping with `tasks:`, a list of {template: NAME, data: FILE}; relative
    data paths are read from the plan's folder."""
    from llmlab.core.yamlfile import load_yaml_mapping

    raw = load_yaml_mapping(Path(path), "eval plan")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise UsageError(f"{path}: an eval plan needs 'tasks:', a list of {{template: NAME, data: FILE}}")
    unknown = sorted(set(raw) - {"tasks"})
    if unknown:
        raise UsageError(f"{path}: unknown key '{unknown[0]}' (an eval plan has only 'tasks')")
    out = []
    for n, task in enumerate(tasks, 1):
        if not isinstance(task, dict) or not isinstance(task.get("template"), str) or not isinstance(task.get("data"), str):
            raise UsageError(f"{path}: task {n} needs 'template' and 'data' (strings)")
        data = Path(task["data"]).expanduser()
        if not data.is_absolute():
            data = Path(path).parent / data
        out.append((task["template"], str(data)))
    return out


def plan_config(plan_: EvalPlan, chat: Optional[str]) -> dict[str, object]:
    """The settings of an eval, as the JSON report and the run log record them."""
    combos = plan_.combos()
    return {"shots": sorted({c.shots for c in combos}), "seeds": plan_.seeds,
            "calibration": list(dict.fromkeys(c.calibrate for c in combos)),
            "resolved": [{"template": c.template.name, "shots": c.shots, "calibrate": c.calibrate, **{
                f"{k}_source": v for k, v in c.sources.items()}} for c in combos],
            "method": plan_.method, "normalize": plan_.normalize, "batch_size": plan_.batch_size,
            "offset": plan_.offset, "limit": plan_.limit, "sample": plan_.sample, "sample_seed": plan_.sample_seed,
            "log_samples": plan_.log_samples,
            "references": plan_.references, "chat": chat,
            "shot_selection": plan_.prompt.selection, "shot_format": plan_.prompt.shot_format,
            "overflow": plan_.prompt.overflow, "examples": plan_.prompt.examples, "adapters": list(plan_.adapters),
            "generation": {"max_new_tokens": plan_.max_new_tokens} if plan_.max_new_tokens else {}}


def adapter_tasks(plan_: EvalPlan, record: Mapping[str, object]) -> list[EvalTask]:
    """The plan's tasks whose template is the one an adapter (its record) was trained with."""
    return [t for t in plan_.tasks if t.template.name == record.get("template")]


def extra_items(plan_: EvalPlan) -> int:
    """Items the adapter rows score (for the progress bar's total)."""
    from llmlab.backends import adapters

    return sum(len(t.items) for f in plan_.adapters for t in adapter_tasks(plan_, adapters.read_record(f)))


# ---------------------------------------------------------------- data checks


def check_data(items: list[Item], template: Template, references: Sequence[str]) -> list[str]:
    """Validate labeled data for a template; returns the reference fields for generate templates."""
    from llmlab.io import records as io
    from llmlab.prompting import prompts

    io.check_unique_ids(items)
    prompts.require_fields(items, template)
    if template.task == "classify":
        for item in items:
            if template.target not in item.fields:
                raise DataError(f"{item.source}: no label field '{template.target}' "
                                f"(fields: {', '.join(item.fields)})")
            if str(item.fields[template.target]) not in template.labels:
                raise DataError(f"{item.source}: label '{item.fields[template.target]}' is not one of "
                                f"template '{template.name}''s labels: {', '.join(template.labels)}")
        return []
    fields = list(references) or [f for f in [template.target, *template.references] if f]
    present = [f for f in fields if all(f in item.fields for item in items)]
    if not present:
        raise DataError(f"no reference field for template '{template.name}' in every row "
                        f"(looked for {', '.join(fields) or 'none'}; fields: {', '.join(items[0].fields)}); "
                        "name one with --reference FIELD")
    return present


def prepare(specs: Sequence[tuple[str, str]], prompt: PromptConfig, fmt: str, offset: int, limit: Optional[int],
            references: Sequence[str], sample: Optional[int] = None, sample_seed: int = 0) -> list[EvalTask]:
    """Templates found, data read (each file once) and checked against its templates, before any
    model time."""
    from llmlab.orchestration import session

    session.check_prompt_options(prompt)
    read: dict[str, list[Item]] = {}
    tasks = []
    for name, data in specs:
        template = session.find_template(replace(prompt, template=name, shots=None))
        assert template is not None  # a name was given
        if data not in read:
            read[data] = session.read_input(data, fmt, "text", offset, limit, sample, sample_seed)
        refs = check_data(read[data], template, references)
        tasks.append(EvalTask(template, data, read[data], refs))
    names = [t.template.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup and len({(t.template.name, t.data) for t in tasks}) < len(tasks):
        raise UsageError(f"template '{dup}' is given twice with the same data")
    return tasks


def make_plan(cfg: EvalConfig) -> EvalPlan:
    """`llmlab eval`'s whole plan, every check done before any model time: the tasks (templates found,
    data read and checked), each template's shots and calibration resolved, the probe's rows, the
    report path and each template's generation settings."""
    from llmlab.io.records import check_output_path
    from llmlab.orchestration import adapted
    from llmlab.orchestration.session import settings_for

    specs = [parse_task(t, cfg.data) for t in cfg.templates]
    specs += load_plan_file(cfg.plan_file) if cfg.plan_file else []
    if not specs:
        raise UsageError("nothing to evaluate: give -t TEMPLATE --data FILE, -t TEMPLATE=FILE, or --plan FILE")
    tasks = prepare(specs, cfg.prompt, cfg.input_format, cfg.offset, cfg.limit, cfg.references, cfg.sample,
                    cfg.sample_seed)
    plan_ = EvalPlan(tasks, cfg.shots, cfg.seeds, cfg.calibration, cfg.method, cfg.normalize, cfg.batch_size,
                     cfg.prompt, cfg.max_new_tokens, cfg.log_samples, list(cfg.references), cfg.offset, cfg.limit,
                     ensemble=cfg.ensemble, sample=cfg.sample, sample_seed=cfg.sample_seed, probe=cfg.probe,
                     adapters=adapted.parse_adapters(cfg.adapters))
    for combo in plan_.combos():  # also checks --seeds and --calibration
        if combo.shots and not combo.template.examples and not cfg.prompt.examples:
            raise UsageError(f"--shots {combo.shots}: template '{combo.template.name}' has no examples to draw "
                             "demonstrations from; give --examples FILE or --shots 0")
        settings_for(combo.template, None, {"max_new_tokens": cfg.max_new_tokens})  # a bad generation: key
    plan_.probe_sources()  # --probe-data's (or the template's probe:) rows
    if cfg.report:
        check_output_path(cfg.report, "--report")
    return plan_
