"""In-context probing (Amini & Ciaramita 2023, "In-Context Probing: Toward Building Robust Classifiers
via Probing Large Language Models"): read the label from the model's hidden state at the answer
position of the whole prompt (instruction, demonstrations, input) with a logistic regression fitted
on labelled rows, instead of from the probabilities of the label tokens.

The prompt still does the work (the state is read where the model is about to write the label, after
the demonstrations), but the readout is learned from many more labelled rows than fit in the context.
A fitted probe is cached under the llmlab cache dir (`probes/`), named by a hash of everything that
decides it (the model, the layers, the C grid, and every training prompt with its label), so it is
fitted once. A probe can also be given already fitted: a `.npz` file (`optimize` writes one beside
the template it writes) that names its model and layers; it is used as it is, for every draw, and
refused with another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

from llmlab.core.errors import DataError, UsageError

_log = logging.getLogger("llmlab")  # library code never prints; the CLI shows this log
if TYPE_CHECKING:  # types only: nothing more is imported at run time
    import numpy as np
    from numpy.typing import ArrayLike, NDArray

    from llmlab.core.console import Bar
    from llmlab.io.items import Item
    from llmlab.prompting.templates import Template

# Default layers, as fractions of the model's depth (smollm2: layers 18, 24 and 30 of 30), their
# states concatenated. Measured on SST-2 with smollm2 (prompts/README.md): the first half of the
# layers carries little of the label (layer 12 alone: 74%), layers 18-30 carry most of it.
DEPTHS = (0.6, 0.8, 1.0)
# Inverse L2 strengths tried; the one with the best 5-fold cross-validated accuracy on the probe's
# own training rows is used (never the evaluated data). Small: thousands of dimensions, few rows.
GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def default_layers(layers: int) -> list[int]:
    """The hidden states read by default: indices into (embeddings, layer 1, ..., layer `layers`)."""
    return sorted({max(1, round(d * layers)) for d in DEPTHS})


def parse_layers(text: str | None, layers: int) -> list[int]:
    """--probe-layers: a comma list of layer indices (0 = the embeddings, negative counts from the
    last layer: -1 = the last); None = the defaults."""
    if not text:
        return default_layers(layers)
    out = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"invalid --probe-layers '{text}': give layer numbers, e.g. 18,24,30") from None
        n = n + layers + 1 if n < 0 else n
        if not 0 <= n <= layers:
            raise UsageError(f"invalid --probe-layers '{text}': this model has layers 0 (embeddings) to {layers}")
        out.append(n)
    return sorted(set(out))


@dataclass
class Source:
    """What classify needs to fit probes: the labelled rows (already sampled), the layers asked for
    (--probe-layers, None = the defaults), where they came from (for messages), and the CLI's
    progress bar and info line (library code never prints)."""

    items: list[Item]
    layers: str | None = None
    path: str = "--probe-data"
    progress: Callable[[int, str], ContextManager[Bar]] | None = None  # None: no bar
    info: Callable[[str], None] = lambda message: None
    fitted: Probe | None = None  # a .npz probe given already fitted (then no items)

    @property
    def rows(self) -> int:
        """The labelled rows behind the probe: the rows to fit on, or those a fitted one was fitted on."""
        return self.fitted.rows if self.fitted is not None else len(self.items)


def load_source(path: str, size: int, layers: str | None, template: Template,
                progress: Callable[[int, str], ContextManager[Bar]] | None = None,
                info: Callable[[str], None] = lambda message: None) -> Source:
    """--probe-data FILE read and checked before any model time: the template's fields and a
    known label on every row; then a fixed sample of `size` rows (eval --sample's: the rows
    shuffled with random.Random(0), the first `size` kept; all of them when there are fewer)."""
    from llmlab.core import config
    from llmlab.io import records as io
    from llmlab.prompting import templates

    if size < 2:
        raise UsageError(f"invalid --probe-size {size}: the probe needs at least 2 labelled rows")
    if template.target is None:
        raise UsageError(f"template '{template.name}' has no target: the probe needs a labelled field")
    if path != "-" and not Path(path).is_file():
        raise DataError(f"--probe-data file '{path}' not found")
    if path.endswith(".npz"):
        return Source([], layers, path, progress, info, fitted=load_fitted(path, layers, template))
    items = io.read_items(path, "auto", text_field=template.fields[0])
    items = config.sample(items, min(size, len(items)), 0, path)
    templates.require_fields(items, template)
    for item in items:
        gold = item.fields.get(template.target)
        if gold is None or str(gold) not in template.labels:
            raise UsageError(f"{path}: row {item.index + 1} has {template.target} {gold!r}, not one of the "
                             f"template's labels ({', '.join(template.labels)})")
    missing = sorted(set(template.labels) - {str(item.fields[template.target]) for item in items})
    if missing:
        raise UsageError(f"--probe-data has no rows labelled {', '.join(missing)}: the probe needs "
                         "examples of every label")
    return Source(items, layers, path, progress, info)


@dataclass
class Probe:
    """A fitted probe: probabilities = softmax(W · (h - mean) / scale + b) over `labels`.
    mean, scale: per-dimension standardization of the training states; coef [k, D], intercept [k]
    (k = number of labels; a two-label probe keeps sklearn's single row, the second label's logit)."""

    labels: list[str]
    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    coef: NDArray[np.float64]
    intercept: NDArray[np.float64]
    rows: int  # training rows it was fitted on
    train_accuracy: float  # on those rows: far above test accuracy means too few rows or too large C
    c: float = GRID[0]  # the inverse L2 strength cross-validation chose
    cv_accuracy: float | None = None  # the chosen C's cross-validated accuracy (None: too few rows per label)
    chance: float = 0.0  # the most common label's share of the rows: always answering it scores this
    model: str | None = None  # a probe written to be given as a file: the model whose states it reads,
    layers: list[int] | None = None  # the layers, and the form of the prompts whose states it read
    prompt_form: str | None = None  # (Classifier.prompt_form; cache entries leave all three None)

    def at_chance(self) -> bool:
        """Cross-validated accuracy within two standard errors of always answering the commonest label."""
        if self.cv_accuracy is None:
            return False
        return self.cv_accuracy <= self.chance + 2 * math.sqrt(self.chance * (1 - self.chance) / max(1, self.rows))

    def predict(self, states: ArrayLike) -> list[list[float]]:
        """Label probabilities (in `labels` order) for each hidden state [n, D]."""
        import numpy as np

        z = ((np.asarray(states, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        if z.shape[1] == 1:  # binary: sklearn's one logit is the second class's log-odds
            z = np.concatenate([np.zeros_like(z), z], axis=1)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).tolist()

    def save(self, path: Path) -> None:
        import numpy as np

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # an interrupted save never leaves a half-written probe behind
            np.savez(f, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                     meta=json.dumps({"labels": self.labels, "rows": self.rows, "c": self.c,
                                     "train_accuracy": self.train_accuracy, "cv_accuracy": self.cv_accuracy,
                                     "chance": self.chance, "model": self.model, "layers": self.layers,
                                     "prompt_form": self.prompt_form}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, labels: Sequence[str]) -> "Probe":
        """A saved probe, never unpickled, checked to fit together and to answer `labels`
        (ValueError otherwise)."""
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            probe = cls(meta["labels"], data["mean"], data["scale"], data["coef"], data["intercept"],
                        int(meta["rows"]), float(meta["train_accuracy"]), float(meta["c"]),
                        meta.get("cv_accuracy"), float(meta.get("chance", 0.0)), meta.get("model"),
                        meta.get("layers"), meta.get("prompt_form"))
        width = probe.mean.shape[-1] if probe.mean.ndim == 1 else -1
        rows = 1 if len(labels) == 2 else len(labels)
        if probe.labels != list(labels) or width < 1 or probe.scale.shape != (width,) \
                or probe.coef.shape != (rows, width) or probe.intercept.shape != (rows,):
            raise ValueError(f"labels {probe.labels} and arrays {probe.mean.shape}, {probe.coef.shape} do not fit "
                             f"a probe for {list(labels)}")
        return probe


def load_fitted(path: str, layers: str | None, template: Template) -> Probe:
    """A probe given already fitted (.npz), checked against the template's labels before any model
    time; it is read at the layers it was fitted at, so --probe-layers is refused."""
    try:
        probe = Probe.load(Path(path), list(template.labels))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a fitted probe for template '{template.name}' ({str(exc)[:200]}); give a "
                        "probe .npz that optimize wrote for it, or labelled rows (JSONL/CSV) to fit one") from None
    if probe.model is None or probe.layers is None or probe.prompt_form is None:
        raise DataError(f"{path}: this probe does not record the model, layers and prompts it was fitted on; give "
                        "the labelled rows it was fitted on instead (--probe-data ROWS)")
    if layers is not None:
        raise UsageError(f"--probe-layers: {path} is a fitted probe, read at layers "
                         f"{','.join(map(str, probe.layers))}; drop --probe-layers")
    return probe


def check_form(source: Source, form: str) -> None:
    """A fitted probe reads the states of prompts of one form: any other is refused."""
    if source.fitted is not None and source.fitted.prompt_form != form:
        raise UsageError(f"the probe {source.path} was fitted on the states of other prompts than these (prompt "
                         f"form {source.fitted.prompt_form}, not {form}: the template, its demonstrations, shots, "
                         "format or chat differ): run it with the template it was written for and that template's "
                         "own settings, or give --probe-data ROWS")


def check_model(source: Source, model: str) -> None:
    """A fitted probe reads one model's hidden states: any other model is refused."""
    if source.fitted is not None and source.fitted.model != model:
        raise UsageError(f"the probe {source.path} was fitted on {source.fitted.model}'s hidden states, not "
                         f"{model}'s: use -m {source.fitted.model}, or give --probe-data ROWS to fit one for {model}")


def fit(states: ArrayLike, gold: Sequence[str], labels: Sequence[str]) -> Probe:
    """Standardize the states, then an L2-regularized logistic regression (lbfgs) with C chosen
    from GRID by cross-validation on these rows (k-fold, k = 5 or the rarest label's count)."""
    import warnings

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    counts = {label: list(gold).count(label) for label in labels}
    missing = [label for label, n in counts.items() if n == 0]
    if missing:
        raise UsageError(f"--probe-data has no rows labelled {', '.join(missing)}: the probe needs "
                         "examples of every label")
    raw = np.asarray(states, dtype=np.float64)
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    scale[scale == 0] = 1.0  # a constant dimension carries nothing; avoid 0/0
    x = (raw - mean) / scale
    y = np.array([list(labels).index(g) for g in gold])
    folds = min(5, min(counts.values()))
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence and deprecation chatter
        for c in GRID if folds >= 2 else ():
            scores[c] = float(cross_val_score(LogisticRegression(C=c, max_iter=5000), x, y, cv=folds).mean())
        c = max(GRID, key=lambda c: scores[c]) if scores else GRID[0]
        model = LogisticRegression(C=c, max_iter=5000).fit(x, y)
    probe = Probe(list(labels), mean, scale, model.coef_, model.intercept_, len(gold), 0.0, c, scores.get(c),
                  max(counts.values()) / len(gold))
    predicted = np.argmax(probe.predict(raw), axis=1)
    probe.train_accuracy = float((predicted == y).mean())
    return probe


def key(model: str, layers: Sequence[int], prompts: Sequence[str], gold: Sequence[str]) -> str:
    """The cache name: a hash of everything the fitted probe depends on."""
    h = hashlib.sha256(f"{model}\x00{list(layers)}\x00{GRID}".encode())
    for text, label in zip(prompts, gold):
        h.update(f"\x00{text}\x01{label}".encode())
    return h.hexdigest()[:24]


def load_or_fit(name: str, states: Callable[[], ArrayLike], gold: Sequence[str],
                labels: Sequence[str]) -> tuple[Probe, bool]:
    """The cached probe `name`, else fit one on states() and cache it. Returns (probe, from cache)."""
    from llmlab.backends.loading import cache_root

    path = cache_root() / "probes" / f"{name}.npz"
    probe, cached = None, False
    if path.is_file():
        try:
            probe, cached = Probe.load(path, labels), True
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign cache entry is refitted, never trusted
            _log.warning(f"the cached probe '{path}' is unusable ({type(exc).__name__}: {str(exc)[:160]}); refitting it")
    if probe is None:
        probe = fit(states(), gold, labels)
        try:
            probe.save(path)
        except OSError:
            pass  # an unwritable cache costs a refit next time, never the run
    if probe.at_chance():
        _log.warning(f"the probe scores {probe.cv_accuracy:.1%} in cross-validation on its {probe.rows} rows, not "
                     f"clearly above always answering the commonest label ({probe.chance:.1%}): its answers are "
                     "at chance; give --probe-data rows that differ, or another --calibration")
    return probe, cached
