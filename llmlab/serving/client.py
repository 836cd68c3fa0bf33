"""`--server URL` (or LLMLAB_SERVER): generate and classify send their inputs to a running `llmlab
serve` and write the records it returns, exactly as the in-process run writes them: the same checks
before any work, the same files, --resume and run log. Only the standard library talks HTTP here,
and nothing here imports torch or transformers, so the command starts in a fraction of a second."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import urlsplit

from llmlab.core.errors import ModelError, UsageError

if TYPE_CHECKING:
    from llmlab.core.config import ClassifyConfig, GenerateConfig
    from llmlab.io.items import Item
    from llmlab.orchestration.session import Hooks
    from llmlab.prompting.templates import Template
    from llmlab.core.config import ModelConfig
    from llmlab.io.evalreport import Report as EvalReport
    from llmlab.learn.nexttoken import StepRecord
    from llmlab.orchestration.evalplan import EvalPlan
    from llmlab.serving.eval_api import EvalReply, NextReply
    from llmlab.serving.llmlab_api import ClassifyReply, GenerateReply

_Row = TypeVar("_Row")

ENV = "LLMLAB_SERVER"
KEY_ENV = "LLMLAB_API_KEY"


def post(url: str, path: str, body: Mapping[str, object], timeout: float = 3600) -> bytes:
    """POST JSON; the reply's body (JSON). A server error becomes one line naming the server.
    http.client, not urllib.request: the one-token round trip should not pay for ssl and email imports."""
    import http.client

    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {url}: give an http:// URL, e.g. http://127.0.0.1:8000")
    headers = {"Content-Type": "application/json"}
    if os.environ.get(KEY_ENV):
        headers["Authorization"] = f"Bearer {os.environ[KEY_ENV]}"
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        connection = kind(parts.hostname, parts.port, timeout=timeout)
        try:
            connection.request("POST", parts.path.rstrip("/") + path, json.dumps(body).encode(), headers)
            reply = connection.getresponse()
            status, data = reply.status, reply.read()
        finally:
            connection.close()
    except OSError as exc:
        raise ModelError(f"no llmlab server answers at {url} ({exc}): start one with `llmlab serve`, "
                         f"or drop --server / {ENV}") from None
    if status >= 400:
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {status}"
        raise (UsageError if status in (400, 404, 413) else ModelError)(f"the server at {url}: {message}")
    return data


def _prompt_body(cfg: Union[GenerateConfig, ClassifyConfig]) -> dict[str, object]:
    """The prompt options the server resolves; a file named here can't be read there."""
    p = cfg.prompt
    if p.template and (p.template.endswith((".yaml", ".yml")) or os.sep in p.template):
        raise UsageError(f"--server: the server finds templates by name; '{p.template}' is a file here "
                         "(drop --server to use it)")
    for flag, value in (("--examples", p.examples), ("--prompts-dir", p.prompts_dir)):
        if value:
            raise UsageError(f"--server: {flag} names files here, which the server can't read; drop {flag} "
                             "or --server")
    return {"model": cfg.model.spec, "template": p.template, "shots": p.shots, "selection": p.selection,
            "seed": p.seed, "shot_format": p.shot_format, "overflow": p.overflow, "chat": cfg.model.chat}


def _chunks(items: list[_Row], size: int) -> list[list[_Row]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def generate(cfg: GenerateConfig, hooks: Hooks, url: str, display: bool = False) -> None:
    """session.generate's work, done by the server; records written here as the chunks return."""
    import contextlib

    from llmlab.core.settings import load_preset
    from llmlab.io import records as io
    from llmlab.orchestration import session

    cfg, template, settings, items = session.generate_inputs(cfg, hooks)
    single = cfg.input.path is None and cfg.output.terminal and (display or not settings.logprobs)
    if single and settings.logprobs:
        raise UsageError("--server: --logprobs on a terminal colours tokens in-process only; write -o FILE.jsonl")
    flags = {**(load_preset(cfg.preset) if cfg.preset else {}), **{k: v for k, v in cfg.flags.items() if v is not None}}
    body = {**_prompt_body(cfg), "field": cfg.input.field, "settings": flags, "echo": cfg.echo,
            "batch_size": cfg.batch_size, "gen_engine": cfg.gen_engine}
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume)
    todo = sink.pending(items)
    if cfg.output.resume and len(todo) < len(items):
        hooks.info(f"--resume: {len(items) - len(todo)} of {len(items)} inputs already done")
    if not todo:
        return None
    with hooks.open_run("generate", config=session._logged_config(cfg, settings), templates=template,
                        data=cfg.input.path) as log, contextlib.ExitStack() as stack:
        writer = None if single else stack.enter_context(sink)
        bar = None if single else stack.enter_context(hooks.progress(len(todo), "generating"))
        for chunk in _chunks(todo, 4 * (cfg.batch_size or 8)):
            sent = {**body, "inputs": [item.fields for item in chunk]}
            reply: GenerateReply = json.loads(post(url, "/v1/generate", sent))  # the shape llmlab_api answers with
            log.update(model=reply["model"], device=url)
            for warning in reply["warnings"]:
                hooks.warn(warning)
            for item, rec, text in zip(chunk, reply["results"], reply["model_texts"]):
                rec["index"] = item.index
                if writer is None:
                    completions = rec.get("completions", [rec["completion"]])
                    assert isinstance(completions, list)  # generation records hold a list of texts
                    hooks.emit("".join(str(c) + "\n" for c in completions))
                else:
                    writer.write(rec)
                    if bar is not None:
                        bar.advance(1)
                log.item(item.index, text, str(rec["completion"]), key=item.key,
                         extra={"input": item.fields, **({"completions": rec["completions"]}
                                                         if "completions" in rec else {})})
        log.metrics({"items": len(todo)})
    return None


def classify(cfg: ClassifyConfig, hooks: Hooks, url: str,
             table: bool = False) -> Optional[tuple[list[Classified], Labels]]:
    """session.classify's work, done by the server in ONE request (batch calibration and probes see
    every input); returns (results, classifier-like) for the table, as session.classify does."""
    import contextlib

    from llmlab.io import records as io
    from llmlab.orchestration import session
    from llmlab.scoring import classify as clf

    if cfg.probe is not None and cfg.probe.data:
        raise UsageError("--server: --probe-data names a file here, which the server can't read; drop it "
                         "(the template's own probe file is used) or --server")
    cfg, template, items = session.classify_inputs(cfg, hooks=hooks)
    sink = io.Output(cfg.output.path, cfg.output.format, resume=cfg.output.resume, text_key="prediction")
    todo = sink.pending(items)
    if not todo:
        return None
    body = {**_prompt_body(cfg), "method": cfg.method, "normalize": cfg.normalize, "calibration": cfg.calibrate,
            "ensemble": cfg.ensemble, "batch_size": cfg.batch_size, "prompts": True,
            **({"probe_size": cfg.probe.size, "probe_layers": cfg.probe.layers} if cfg.probe else {}),
            "inputs": [item.fields for item in todo]}
    results = []
    with hooks.open_run("classify", config=session._logged_config(cfg), templates=template,
                        data=cfg.input.path) as log:
        reply: ClassifyReply = json.loads(post(url, "/v1/classify", body))  # the shape llmlab_api answers with
        log.update(model=reply["model"], device=url)
        for warning in reply["warnings"]:
            hooks.warn(warning)
        with sink if not table else contextlib.nullcontext() as writer:
            for item, rec, prompt in zip(todo, reply["results"], reply["prompts"]):
                rec["index"] = item.index
                if writer is not None:
                    writer.write(rec)
                result, completion = _classified(item, rec), rec.get("completion")
                log.item(item.index, prompt, completion if isinstance(completion, str) else None, result.prediction,
                         result.probabilities, item.fields.get(template.target) if template.target else None,
                         {"input": item.fields}, key=item.key)
                results.append(result)
        log.metrics(clf.run_metrics(results, template))
    return (results, Labels(template, reply["labels"])) if table else None


@dataclass
class Classified:
    """One input's answer from the server: what the table and run_metrics read of a Classification."""

    item: Item
    prediction: str
    probabilities: dict[str, float]


def _classified(item: Item, rec: Mapping[str, object]) -> Classified:
    """A record of the server's reply as a result: its prediction and each label's probability."""
    probs = rec.get("probabilities")
    return Classified(item, str(rec.get("prediction")), {str(k): float(v) for k, v in probs.items()
                                                          if isinstance(v, (int, float))} if isinstance(probs, dict) else {})


@dataclass
class Labels:
    """What the table reads of a Classifier."""

    template: Template
    labels: list[str]


def refuse(option_values: Mapping[str, object], templates: Sequence[str] = ()) -> None:
    """--server: options naming files or processes here, which the server can't use, and templates
    given as files: one line each, before any work."""
    for flag, given in option_values.items():
        if given:
            raise UsageError(f"--server: {flag} can't go to the server (it names files or processes here); drop "
                             f"{flag} or --server")
    for name in templates:
        if name.endswith((".yaml", ".yml")) or os.sep in name:
            raise UsageError(f"--server: the server finds templates by name; '{name}' is a file here "
                             "(drop --server to use it)")


def evaluate(plan: EvalPlan, model: ModelConfig, hooks: Hooks, url: str) -> EvalReport:
    """evaluate.run's work on a checked plan, done by the server: the same report, and the same run
    log (the server hands back every item and combination it logged, replayed here in order)."""
    import sys

    from llmlab.orchestration.evalplan import plan_config

    probe = {"probe_size": plan.probe.size, "probe_layers": plan.probe.layers} if plan.probe else {}
    body = {"model": model.spec, "chat": model.chat, "shots": plan.shots, "seeds": plan.seeds,
            "calibration": plan.calibration, "method": plan.method, "normalize": plan.normalize,
            "ensemble": plan.ensemble, "batch_size": plan.batch_size, "selection": plan.prompt.selection,
            "shot_format": plan.prompt.shot_format, "overflow": plan.prompt.overflow,
            "max_new_tokens": plan.max_new_tokens, "log_samples": plan.log_samples, "references": plan.references,
            "offset": plan.offset, "limit": plan.limit, "sample": plan.sample, "sample_seed": plan.sample_seed,
            **probe, "tasks": [{"template": t.template.name, "data": t.data,
                                "items": [[i.index, i.fields, i.source] for i in t.items]} for t in plan.tasks]}
    data = ", ".join(dict.fromkeys(t.data for t in plan.tasks))
    with hooks.open_run("eval", config=plan_config(plan, model.chat), templates=[t.template for t in plan.tasks],
                        data=data) as log:
        reply: EvalReply = json.loads(post(url, "/v1/eval", body))  # the shape eval_api answers with
        log.update(model=reply["model"], device=url)
        for warning in reply["warnings"]:
            hooks.warn(warning)
        for note in reply["notes"]:
            hooks.note(note)
        report = reply["report"]
        for call in reply["log"]:
            if call["kind"] == "item":
                log.item(**call["item"])
            else:
                log.eval_combo(report["results"][call["combo"]])
        report["command"] = " ".join(["llmlab", *sys.argv[1:]]) if sys.argv else "llmlab eval"
        return report


def next_steps(url: str, model: ModelConfig, text: str, flags: Mapping[str, object], steps: int,
               show: int, templated: bool = False) -> list[StepRecord]:
    """nexttoken.walk's steps (as to_json dicts), walked by the server; templated: the text went
    through the chat template already."""
    body: dict[str, object] = {"model": model.spec, "chat": model.chat, "prompt": text, "settings": flags, "steps": steps,
            "show": show, "templated": templated}
    reply: NextReply = json.loads(post(url, "/v1/next", body))  # the shape eval_api answers with
    return reply["steps"]
