"""llmlab's own endpoints: /v1/classify, /v1/render and /v1/generate run the very library functions
`llmlab classify`, `llmlab prompt render` and `llmlab generate` run (session.classify,
prompt_render.render, session's generate jobs), on the served model, so settings resolve and answers
come out the same. Templates are looked up by NAME only: a request never names a file here."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional, TypedDict

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, StrictStr

from llmlab.core.config import (ChatMode, ClassifyConfig, GenEngine, GenerateConfig, InputConfig, Method, Normalize,
                                OutputConfig, Overflow, ProbeConfig, PromptConfig, RenderConfig, Selection, ShotFormat,
                                value)
from llmlab.serving.errors import APIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmlab.backends.base import LM
    from llmlab.core.config import ModelConfig, ServeConfig
    from llmlab.io.items import Item
    from llmlab.prompting.templates import Template

CALIBRATIONS = ("off", "contextual", "batch", "domain", "probe")


class _Prompted(BaseModel):
    model_config = ConfigDict(extra="forbid")  # llmlab's own API: a misspelt option is an error, not ignored

    model: Optional[StrictStr] = None
    template: Optional[StrictStr] = None
    text: Optional[StrictStr] = None  # one input of a one-field template
    inputs: Optional[list[dict[str, JsonValue]]] = Field(None, min_length=1)  # inputs by field
    shots: Optional[StrictInt] = Field(None, ge=0)
    selection: Optional[Selection] = None
    seed: Optional[StrictInt] = None
    shot_format: Optional[ShotFormat] = None
    overflow: Overflow = Overflow.drop_shots
    chat: Optional[ChatMode] = None

    def prompt(self) -> PromptConfig:
        name = self.template
        if name is not None and ("/" in name or "\\" in name or name.endswith((".yaml", ".yml"))):
            raise APIError(400, f"template '{name}': the server looks templates up by name only (see "
                           "`llmlab prompt list`)", param="template")
        return PromptConfig(name, self.shots, value(self.selection), self.seed, value(self.shot_format),
                            value(self.overflow))


class ClassifyBody(_Prompted):
    template: StrictStr
    method: Method = Method.score
    normalize: Normalize = Normalize.none
    calibration: Optional[StrictStr] = None  # None: the template's calibrate:, as `llmlab classify`
    ensemble: StrictInt = Field(1, ge=1)
    batch_size: Optional[StrictInt] = Field(16, ge=1)
    probe_size: StrictInt = Field(ProbeConfig.size, ge=1)  # calibration probe: on the template's probe: file
    probe_layers: Optional[StrictStr] = None
    prompts: StrictBool = False  # also return each input's prompt (the CLI's run log keeps it)


class RenderBody(_Prompted):
    template: StrictStr
    max_new_tokens: Optional[StrictInt] = Field(None, ge=1)


class GenerateBody(_Prompted):
    field: StrictStr = "prompt"  # the prompt field of plain (template-less) inputs
    settings: dict[str, JsonValue] = {}  # generation settings by their option names (max_new_tokens, stop...)
    echo: StrictBool = False
    batch_size: Optional[StrictInt] = Field(8, ge=1)
    gen_engine: GenEngine = GenEngine.auto


# The reply bodies (serving.client reads them back). A record: what `llmlab classify/generate/prompt
# render -f jsonl` writes for one input.


class _ClassifyReply(TypedDict):
    object: str
    model: str
    template: str
    labels: list[str]
    calibration: Optional[str]
    results: list[dict[str, object]]  # records, as the commands write them
    warnings: list[str]


class ClassifyReply(_ClassifyReply, total=False):
    prompts: list[str]  # asked for with "prompts": true


class RenderReply(TypedDict):
    object: str
    model: str
    template: str
    window: Optional[int]
    results: list[dict[str, object]]  # records, as the commands write them
    warnings: list[str]


class GenerateReply(TypedDict):
    object: str
    model: str
    settings: dict[str, JsonValue]
    results: list[dict[str, object]]  # records, as the commands write them
    model_texts: list[str]
    warnings: list[str]


def _items(body: _Prompted, template: Optional[Template], cmd: str) -> list[Item]:
    from llmlab.io.records import Item
    from llmlab.orchestration import session

    if (body.text is None) == (body.inputs is None):
        raise APIError(400, "give either text (one input) or inputs (a list of inputs by field)", param="inputs")
    if body.inputs is None:
        if template is None:
            return [Item(0, {getattr(body, "field", "prompt"): body.text}, "text")]
        return [session.template_item(template, body.text, [], cmd)]
    return [Item(n, dict(fields), f"input {n + 1}") for n, fields in enumerate(body.inputs)]


def register(app: FastAPI, model: Callable[[Optional[str]], LM], cfg: ServeConfig) -> None:
    """Add the routes; model(name) is the served model (404 for another name)."""

    @app.post("/v1/classify")
    def classify(body: ClassifyBody) -> dict:
        return dict(run_classify(body, model(body.model), cfg.model))  # a plain dict: FastAPI's response model

    @app.post("/v1/render")
    def render(body: RenderBody) -> dict:
        return dict(run_render(body, model(body.model), cfg.model))

    @app.post("/v1/generate")
    def generate(body: GenerateBody) -> dict:
        return dict(run_generate(body, model(body.model), cfg.model, cfg))


def run_classify(body: ClassifyBody, lm: LM, served: ModelConfig) -> ClassifyReply:
    from llmlab.orchestration import session
    from llmlab.scoring import classify as clf

    if body.calibration is not None and body.calibration not in CALIBRATIONS:
        raise APIError(400, f"calibration '{body.calibration}': choose one of {', '.join(CALIBRATIONS)}",
                       param="calibration")
    prompt = body.prompt()
    warnings: list[str] = []
    template = session.find_template(prompt)
    cfg = ClassifyConfig(model=dataclasses.replace(served, chat=value(body.chat)), prompt=prompt, input=InputConfig(),
                         output=OutputConfig(format="jsonl"), method=value(body.method),
                         normalize=value(body.normalize), calibrate=body.calibration, ensemble=body.ensemble,
                         batch_size=body.batch_size, probe=ProbeConfig(None, body.probe_size, body.probe_layers))
    items = _items(body, template, "classify")
    answer = session.classify(cfg, session.Hooks(warn=warnings.append), table=True, lm=lm, items=items)
    assert answer is not None  # no output file to resume: every input (at least one) is classified
    results, classifier = answer
    out: ClassifyReply = {"object": "classification", "model": lm.name, "template": classifier.template.name,
                           "labels": classifier.labels, "calibration": classifier.calibrate,
                           "results": [clf.record(r, classifier.template, lm.name) for r in results],
                           "warnings": warnings}
    if body.prompts:
        out["prompts"] = [r.prompt for r in results]
    return out


def run_render(body: RenderBody, lm: LM, served: ModelConfig) -> RenderReply:
    from llmlab.orchestration import prompt_render, session

    prompt = body.prompt()
    warnings: list[str] = []
    template = session.required_template(prompt)
    cfg = RenderConfig(dataclasses.replace(served, chat=value(body.chat)), prompt, InputConfig(), "jsonl",
                       body.max_new_tokens)
    run = prompt_render.render(cfg, session.Hooks(warn=warnings.append), items=_items(body, template, "prompt render"),
                               loaded=(lm.tokenizer, lm.window, lm.is_encoder_decoder))
    records = [prompt_render.render_record(r) for r in run.prompts]
    return {"object": "render", "model": lm.name, "template": template.name, "window": run.window,
            "results": records, "warnings": warnings}


def run_generate(body: GenerateBody, lm: LM, served: ModelConfig, limits: ServeConfig) -> GenerateReply:
    """What `llmlab generate` does with its inputs, minus the files: records, in input order (the
    settings within the server's caps on max_tokens and n)."""
    from llmlab.backends import hf_continuous
    from llmlab.serving import openai_api as api
    from llmlab.orchestration import session
    from llmlab.scoring import generation

    prompt = body.prompt()
    warnings: list[str] = []
    hooks = session.Hooks(warn=warnings.append)
    template = session.find_template(prompt)
    cfg = GenerateConfig(model=dataclasses.replace(served, chat=value(body.chat)), prompt=prompt,
                         input=InputConfig(field=body.field), output=OutputConfig(format="jsonl"),
                         flags=dict(body.settings), batch_size=body.batch_size, echo=body.echo,
                         gen_engine=value(body.gen_engine))
    settings = session.settings_for(template, None, cfg.flags)
    api.check_settings(settings, limits)
    hf_continuous.check(cfg.gen_engine, settings, cfg.model.backend)
    items = _items(body, template, "generate")
    if template is not None:
        from llmlab.prompting import prompts

        prompts.require_fields(items, template)
    else:
        from llmlab.io import records

        records.require_field(items, body.field)
    jobs = session._jobs(cfg, session.Session(cfg.model, lm), template, items, settings, hooks)
    outputs = session.run_jobs(lm, jobs, settings, cfg.batch_size, lambda job, output: None, cfg.gen_engine)
    return {"object": "generation", "model": lm.name, "settings": dataclasses.asdict(settings),
            "results": [generation.record(j, o, lm.name, cfg.echo) for j, o in zip(jobs, outputs)],
            "model_texts": [j.model_text for j in jobs], "warnings": warnings}
