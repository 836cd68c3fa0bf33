"""/v1/eval and /v1/next: `llmlab eval --server` and `llmlab next --server`. The client reads and
checks the data (the same plan as in-process, before any model time) and sends the rows; here the
same library code runs on the served model (evaluate.evaluate, nexttoken.walk). Every run-log call
eval makes is recorded, in order, and sent back, so the client's run log ends up as in-process."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Literal, Optional, TypedDict, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, StrictStr

from llmlab.core.config import ChatMode, Method, Normalize, Overflow, ProbeConfig, PromptConfig, Selection, ShotFormat
from llmlab.core.config import value
from llmlab.runs.runlog import NoRun
from llmlab.serving.errors import APIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmlab.backends.base import LM
    from llmlab.core.config import ModelConfig, ServeConfig
    from llmlab.io.evalreport import ModelFacts, Report, Result
    from llmlab.learn.nexttoken import StepRecord


class EvalTaskBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: StrictStr  # a name: the server looks templates up by name only
    data: StrictStr  # the client's path, for the report and the run log
    items: list[tuple[StrictInt, dict[str, JsonValue], StrictStr]] = Field(min_length=1)  # (index, fields, source)


class EvalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    chat: Optional[ChatMode] = None
    tasks: list[EvalTaskBody] = Field(min_length=1)
    shots: Optional[StrictStr] = None
    seeds: StrictInt = Field(1, ge=1)
    calibration: Optional[StrictStr] = None
    method: Method = Method.score
    normalize: Normalize = Normalize.none
    ensemble: StrictInt = Field(1, ge=1)
    batch_size: Optional[StrictInt] = Field(16, ge=1)
    selection: Optional[Selection] = None
    shot_format: Optional[ShotFormat] = None
    overflow: Overflow = Overflow.drop_shots
    max_new_tokens: Optional[StrictInt] = Field(None, ge=1)
    log_samples: StrictBool = False
    references: list[StrictStr] = []
    offset: StrictInt = 0
    limit: Optional[StrictInt] = None
    sample: Optional[StrictInt] = None
    sample_seed: StrictInt = 0
    probe_size: StrictInt = Field(ProbeConfig.size, ge=1)
    probe_layers: Optional[StrictStr] = None


class NextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    prompt: StrictStr
    chat: Optional[ChatMode] = None
    settings: dict[str, JsonValue] = {}  # generation settings by their option names (preset and flags merged)
    steps: StrictInt = Field(1, ge=1, le=256)
    show: StrictInt = Field(10, ge=1, le=1000)
    templated: StrictBool = False  # the prompt went through the chat template already (lab --server's /next)


class LoggedItem(TypedDict):
    """One RunLog.item call, by its parameter names."""

    index: int
    prompt: str | None
    output: str | None
    prediction: str | None
    probabilities: dict[str, float] | None
    gold: JsonValue
    extra: dict[str, JsonValue] | None
    key: str | None
    template: str
    combo: str


class LogCall(TypedDict, total=False):
    kind: Literal["item", "eval_combo"]
    item: LoggedItem  # kind item
    combo: int  # kind eval_combo: the index of the report's result it logged


class EvalReply(TypedDict):
    object: str
    model: str
    report: Report
    log: list[LogCall]
    warnings: list[str]
    notes: list[str]


class NextReply(TypedDict):
    object: str
    model: str
    steps: list[StepRecord]


_ITEM_ARGS = ("index", "prompt", "output", "prediction", "probabilities", "gold", "extra")


class _Recorder(NoRun):
    """Stands in for the run log: remembers each call, in order, for the client to replay."""

    def __init__(self) -> None:
        self.calls: list[LogCall] = []

    def item(self, *args: object, **kwargs: object) -> None:
        named = {"prompt": None, "output": None, "prediction": None, "probabilities": None, "gold": None,
                 "extra": None, "key": None, "template": "", "combo": "", **dict(zip(_ITEM_ARGS, args)), **kwargs}
        self.calls.append({"kind": "item", "item": cast(LoggedItem, named)})  # Run.item's own parameters

    def eval_combo(self, combo_result: Result) -> None:
        self.calls.append({"kind": "eval_combo", "combo": sum(c["kind"] == "eval_combo" for c in self.calls)})


def _name(template: str) -> str:
    if "/" in template or "\\" in template or template.endswith((".yaml", ".yml")):
        raise APIError(400, f"template '{template}': the server looks templates up by name only", param="template")
    return template


def run_eval(body: EvalBody, lm: LM, served: ModelConfig, facts: ModelFacts) -> EvalReply:
    """evaluate.evaluate on the rows sent; the report, and the run-log calls it made."""
    from llmlab.io.items import Item
    from llmlab.orchestration import evalplan, evaluate, session

    prompt = PromptConfig(None, None, value(body.selection), None, value(body.shot_format), value(body.overflow))
    warnings: list[str] = []
    notes: list[str] = []
    hooks = session.Hooks(warn=warnings.append, note=notes.append)
    tasks = []
    for task in body.tasks:
        template = session.required_template(dataclasses.replace(prompt, template=_name(task.template), shots=None))
        items = [Item(index, fields, source) for index, fields, source in task.items]
        tasks.append(evalplan.EvalTask(template, task.data, items,
                                       evalplan.check_data(items, template, body.references)))
    plan = evalplan.EvalPlan(tasks, body.shots, body.seeds, body.calibration, value(body.method),
                             value(body.normalize), body.batch_size, prompt, body.max_new_tokens, body.log_samples,
                             list(body.references), body.offset, body.limit, ensemble=body.ensemble,
                             sample=body.sample, sample_seed=body.sample_seed,
                             probe=ProbeConfig(None, body.probe_size, body.probe_layers))
    plan.probe_sources()
    recorder = _Recorder()
    model = dataclasses.replace(served, chat=value(body.chat))
    report = evaluate.evaluate(session.Session(model, lm, hooks), plan, log=recorder)
    report["model"] = facts  # the served model's own facts (the queue in front of it has none)
    return {"object": "eval", "model": lm.name, "report": report, "log": recorder.calls, "warnings": warnings,
            "notes": notes}


def run_next(body: NextBody, lm: LM) -> NextReply:
    """nexttoken.walk's steps, as `llmlab next` prints them piped."""
    from llmlab.core import settings as settings_mod
    from llmlab.learn import nexttoken
    from llmlab.scoring import generation

    settings = settings_mod.build(dict(body.settings))
    use_chat = body.templated or generation.use_chat(lm.tokenizer, value(body.chat) or "auto")
    wrap = use_chat and not body.templated
    text = generation.chat_text(lm.tokenizer, [{"role": "user", "content": body.prompt}]) if wrap else body.prompt
    steps = [step.to_json() for step in nexttoken.walk(lm, text, use_chat, settings, body.steps, body.show)]
    return {"object": "next", "model": lm.name, "steps": steps}


def register(app: FastAPI, model: Callable[[Optional[str]], LM], cfg: ServeConfig, facts: ModelFacts) -> None:
    @app.post("/v1/eval")
    def evaluate(body: EvalBody) -> dict:
        return dict(run_eval(body, model(body.model), cfg.model, facts))  # a plain dict: FastAPI's response model

    @app.post("/v1/next")
    def next_token(body: NextBody) -> dict:
        return dict(run_next(body, model(body.model)))
