"""The shape of `llmlab eval`'s report (the JSON of --report): what orchestration.evaluate builds,
io.render and the run log read. Keys a report may lack (older reports, a generate task, a row
without an adapter) are in the total=False classes."""

from __future__ import annotations

from typing import Literal, TypedDict


# The metrics a summary holds (classify: the first two; generate: the rest).
MetricName = Literal["accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "exact_match"]


class Stat(TypedDict):
    """One metric over the seeds."""

    mean: float
    std: float
    min: float
    max: float


class Confusion(TypedDict):
    labels: list[str]  # rows: the gold labels
    predicted: list[str]  # columns: the labels, then "unknown" if anything else was predicted
    matrix: list[list[int]]


class LabelScores(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(TypedDict, total=False):
    """One seed's metrics: classify (accuracy ... correct) or generate (rouge1 ... exact_match)."""

    accuracy: float
    macro_f1: float
    per_label: dict[str, LabelScores]
    confusion: Confusion
    prompt_tokens: float  # eval --adapter: prompt tokens per item
    correct: list[bool]  # eval --adapter: each item right or wrong
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float


class Summary(TypedDict, total=False):
    accuracy: Stat
    macro_f1: Stat
    rouge1: Stat
    rouge2: Stat
    rougeL: Stat
    exact_match: Stat
    items_per_s: float


class SeedRun(TypedDict, total=False):
    seed: int
    metrics: Metrics
    items: int
    seconds: float
    items_per_s: float
    item_scores: list[float]  # taken out again by orchestration.paired before the report is written
    samples: list[dict[str, object]]  # --log-samples: the records


class Versus(TypedDict):
    """eval --adapter: the adapter's accuracy minus the first in-context row's, with its 95% interval."""

    baseline: str
    diff: float
    low: float
    high: float


class Cost(TypedDict, total=False):
    k: int | None
    train_seconds: float | None
    train_cpu_seconds: float | None
    trainable_params: int | None
    adapter_bytes: int | None
    prompt_tokens: float | None
    parameters: int | None
    flops_per_item: float | None
    vs_in_context: Versus | None


class Tuned(TypedDict):
    """eval --adapter: what an adapter row's adapter was trained with (its llmlab_adapter.json)."""

    method: str | None
    seed: int | None


class Result(TypedDict, total=False):
    """One combination (template x data x shots x calibration) over its seeds."""

    template: str
    data: str
    data_name: str
    task: str
    shots: int
    calibrate: str | bool  # reports from before calibration methods had names hold a bool
    seeds: list[int]
    sources: dict[str, str]  # setting -> where its value came from ("template", "flag", ...)
    summary: Summary
    runs: list[SeedRun]
    model: str  # eval --adapter
    adapter: str
    cost: Cost
    k: int | None  # eval --adapter: the labelled rows each row used (a learning curve's x)
    tuned: Tuned  # an adapter row's method and seed


class Paired(TypedDict, total=False):
    """A combination against the first on its data (rows of `results`)."""

    row: int
    baseline: int
    difference: float
    low: float
    high: float
    p: float
    p_holm: float
    test: str
    n: int


class DataFacts(TypedDict):
    template: str
    path: str
    name: str
    items: int


class ModelFacts(TypedDict):
    name: str
    type: str | None
    encoder_decoder: bool
    device: str
    dtype: str | None
    window: int | None
    device_map: dict[str, str] | None


class TemplateFacts(TypedDict):
    path: str
    task: str
    text: str


class _Report(TypedDict):
    llmlab: str
    created: str
    command: str
    model: ModelFacts
    data: list[DataFacts]
    config: dict[str, object]
    templates: dict[str, TemplateFacts]
    results: list[Result]
    paired: list[Paired]
    versions: dict[str, str]


class Report(_Report, total=False):
    processes: int  # eval --processes N


class ClassifyMetrics(TypedDict, total=False):
    """classify's numbers over a run (llmlab.scoring.classify.run_metrics)."""

    items: int
    labeled: int
    accuracy: float
