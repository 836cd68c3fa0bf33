"""One rule for a run's settings, in every command: a template's own defaults (`shots:`, `calibrate:`,
`probe:`) apply unless a flag says otherwise. classify, eval, compare and the commands built on them
call these functions and nothing else decides; each value keeps where it came from, so tables, reports
and the run log can say `4 (template)`.

Sources: "flag" (given on the command line), "template" (the template's own default), "default"
(llmlab's: 0 shots, calibration off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Generic, Optional, Protocol, Sequence, TypeVar

from llmlab.core.config import ProbeConfig
from llmlab.core.errors import UsageError
from llmlab.scoring.classify import CALIBRATIONS

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.core.console import Bar
    from llmlab.prompting.templates import Template
    from llmlab.scoring.probe import Source

T = TypeVar("T")
# Shorthands --calibration accepts: `--calibrate` is `--calibration contextual` in every command.
_SHORTHANDS = {"on": ["contextual"], "both": ["off", "contextual"]}


@dataclass(frozen=True)
class Sourced(Generic[T]):
    value: T
    source: str  # flag, template or default

    def label(self) -> str:
        """`4` when a flag said so, else `4 (template)` / `0 (default)`."""
        return str(self.value) if self.source == "flag" else f"{self.value} ({self.source})"


def calibration_flag(calibration: Optional[str], calibrate: bool) -> Optional[str]:
    """The one spelling: --calibrate is --calibration contextual; both at once must agree."""
    if calibrate and calibration not in (None, "contextual", "on"):
        raise UsageError(f"--calibrate means --calibration contextual: drop one of --calibrate and "
                         f"--calibration {calibration}")
    return "contextual" if calibrate else calibration


def parse_calibrations(text: str) -> list[str]:
    """--calibration's value: a method, or a comma list of them (on = contextual, both = off,contextual)."""
    modes: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        for mode in _SHORTHANDS.get(part, [part]):
            if mode not in CALIBRATIONS:
                raise UsageError(f"invalid --calibration '{text}': choose {', '.join(CALIBRATIONS)} "
                                 "(or a comma list of them)")
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise UsageError(f"invalid --calibration '{text}': choose {', '.join(CALIBRATIONS)}")
    return modes


def calibrations(flag: Optional[str], template: Optional[Template], method: str = "score",
                 probe_data: Optional[str] = None) -> list[Sourced[str]]:
    """The calibration method(s) a classify template runs with: --calibration (a list in eval), else
    probe when --probe-data is given, else the template's `calibrate:`, else off. Calibration adjusts
    label probabilities, so it needs --method score; generate templates are never calibrated."""
    if template is not None and template.task != "classify":
        return [Sourced("off", "default")]
    if flag is not None:
        modes = parse_calibrations(flag)
        if method != "score" and modes != ["off"]:
            raise UsageError("--calibration needs --method score: it adjusts label probabilities")
        return [Sourced(m, "flag") for m in modes]
    if method != "score":
        return [Sourced("off", "default")]
    if probe_data is not None:
        return [Sourced("probe", "flag")]
    if template is not None and template.calibrate:
        return [Sourced(template.calibrate, "template")]
    return [Sourced("off", "default")]


def calibration(flag: Optional[str], template: Optional[Template], method: str = "score",
                probe_data: Optional[str] = None) -> Sourced[str]:
    """One calibration method (classify, compare): as `calibrations`, a list refused."""
    found = calibrations(flag, template, method, probe_data)
    if len(found) > 1:
        raise UsageError(f"--calibration {flag}: one method here (eval compares several)")
    return found[0]


def parse_shots(text: str) -> list[int]:
    """--shots as eval takes it: counts like 0,1,4,8."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"invalid --shots '{text}': give counts like 0,1,4,8") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"invalid --shots '{text}': give counts >= 0 like 0,1,4,8")
    return list(dict.fromkeys(values))


def shots(flag: Optional[int], template: Optional[Template]) -> Sourced[int]:
    """Demonstrations per prompt: --shots, else the template's `shots:`, else 0."""
    if flag is not None:
        if flag < 0:
            raise UsageError(f"invalid --shots {flag}: must be >= 0")
        return Sourced(flag, "flag")
    if template is not None and template.shots is not None:
        return Sourced(template.shots, "template")
    return Sourced(0, "default")


def shot_counts(flag: Optional[str], template: Optional[Template]) -> list[Sourced[int]]:
    """eval's --shots (a list), else the template's `shots:`, else 0."""
    if flag is None:
        return [shots(None, template)]
    return [Sourced(n, "flag") for n in parse_shots(flag)]


class ProbeHooks(Protocol):
    """What a probe's rows need of the session's hooks (session.Hooks): a progress bar and an info line."""

    @property
    def progress(self) -> Callable[[int, str], ContextManager[Bar]]: ...
    @property
    def note(self) -> Callable[[str], None]: ...


def probe_source(probe: ProbeConfig | None, modes: str | Sequence[str], template: Template,
                 hooks: ProbeHooks | None = None) -> Source | None:
    """The probe's rows, read and checked before any model time: --probe-data, else the template's
    probe: file (None when no mode is probe). hooks: the session's (progress bar, info line), or None."""
    modes = [modes] if isinstance(modes, str) else list(modes)
    data = probe.data if probe is not None else None
    if "probe" not in modes:
        if data is not None or (probe is not None and (probe.layers or probe.size != ProbeConfig.size)):
            flag = ("--probe-data" if data is not None else
                    "--probe-layers" if probe is not None and probe.layers else "--probe-size")
            raise UsageError(f"{flag} is read only with --calibration probe: add it, or drop {flag}")
        return None
    if data is None and template.probe_path is None:
        raise UsageError("--calibration probe needs --probe-data FILE: labelled rows to fit the probe on")
    from llmlab.scoring import probe as probes

    probe = probe or ProbeConfig()
    data = data or str(template.probe_path)
    if hooks is None:  # no bar, no info line
        return probes.load_source(data, probe.size, probe.layers, template)
    # hooks.note: a probe fit is long, so it is said even when piped (quiet only with -q)
    return probes.load_source(data, probe.size, probe.layers, template, hooks.progress, hooks.note)
