"""`llmlab tune`: train a PEFT adapter on a template's prompts (llmlab.tuning.plan decides the rows).

Classify templates learn T-Few's rank-classification loss (Liu et al. 2022) over the label words as
continuations of exactly the prompt classify sends: the gold label's language-model loss, an
unlikelihood term on the other labels' tokens, and a cross-entropy over the labels' length-normalised
scores. Generate templates learn the target text (then end of text) after the prompt. The best
step on the held-out slice is kept; the folder is rewritten at each new best (and at the end when
there is no held-out slice), so Ctrl-C or a crash leaves the last checkpoint with its record."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Sequence, Union

from llmlab.core.config import PromptConfig, TuneConfig
from llmlab.core.errors import UsageError
from llmlab.io.locks import SIGTERM_EXIT, SigtermAsExit
from llmlab.tuning import checkpoint, plan as plans

if TYPE_CHECKING:
    import torch

    from llmlab.backends.adapters import Record
    from llmlab.backends.hf import HFLM
    from llmlab.backends.trainable import Trainable
    from llmlab.io.items import Item
    from llmlab.orchestration.session import Hooks
    from llmlab.prompting.prompts import PromptBuilder
    from llmlab.prompting.templates import Template
    from llmlab.runs.runlog import NoRun, Run


@dataclass
class Example:
    """One training row as token ids: (context, continuation) per label (classify: gold is the
    index of the right one) or the single target (generate: gold 0)."""

    rows: list[tuple[list[int], list[int]]]
    gold: int


def examples(lm: HFLM, builder: PromptBuilder, template: Template, target: str, items: Sequence[Item]) -> list[Example]:
    """Prompts built by the same PromptBuilder classify and generate use, split into tokens by the
    same rule the scorer uses (HFLM.encode_pairs)."""
    from llmlab.backends.base import LLRequest

    out = []
    for item in items:
        prompt = builder.build(item)
        if template.task == "classify":
            labels = list(template.labels)
            conts = [prompt.answer_prefix + template.verbalize(label) for label in labels]
            gold = labels.index(str(item.fields[target]))
        else:
            conts = [prompt.answer_prefix + str(item.fields[target]) + (lm.tokenizer.eos_token or "")]
            gold = 0
        requests = [LLRequest(prompt.text, c, prompt.chat, prefix=prompt.prefix, context_ids=prompt.ids) for c in conts]
        out.append(Example(lm.encode_pairs(requests), gold))
    return out


def loss(model: Trainable, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """(mean loss over the batch, how many the model ranks right). One label: the target's mean
    token loss. Several: T-Few's L_LM + L_UL + L_LN."""
    import torch

    logprobs = model.logprobs([row for ex in batch for row in ex.rows])
    total: torch.Tensor | float = 0.0
    right, at = 0, 0
    for ex in batch:
        lps = logprobs[at : at + len(ex.rows)]
        at += len(ex.rows)
        lm_loss = -lps[ex.gold].mean()
        if len(lps) == 1:
            total = total + lm_loss
            continue
        wrong = [lp for n, lp in enumerate(lps) if n != ex.gold]
        unlikely = -torch.log1p(-torch.cat(wrong).exp().clamp(max=1 - 1e-6)).mean()
        means = torch.stack([lp.mean() for lp in lps])
        normalised = torch.nn.functional.cross_entropy(means[None], torch.tensor([ex.gold], device=means.device))
        total = total + lm_loss + unlikely + normalised
        right += int(torch.stack([lp.sum() for lp in lps]).argmax().item() == ex.gold)
    assert isinstance(total, torch.Tensor)  # a batch has rows, and each adds a tensor
    return total / len(batch), right


def held_out_score(model: Trainable, rows: Sequence[Example], size: int) -> tuple[float, float | None]:
    """(mean loss, accuracy or None for generate templates) on the held-out rows."""
    import torch

    model.train(False)
    total, right = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            value, hits = loss(model, batch)
            total += float(value) * len(batch)
            right += hits
    model.train(True)
    classify = len(rows[0].rows) > 1
    return total / len(rows), (right / len(rows) if classify else None)


def batches(count: int, size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of row indexes: each pass over the rows in a new seeded order."""
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        for start in range(0, count, size):
            yield order[start : start + size]


def tune(cfg: TuneConfig, hooks: Hooks) -> Record:
    """Train, keep the best held-out step in cfg.output, return its record."""
    from llmlab.backends import models
    from llmlab.orchestration import session

    plan = plans.prepare(cfg)
    _, _, encoder_decoder = models.load_tokenizer(cfg.model.spec)  # the tokenizer only: no weights yet
    plans.check_prompt_tuning(cfg.method, encoder_decoder)
    # Opened before the model loads: a log that can't be written fails before any model time.
    with hooks.open_run("tune", config=asdict(cfg), templates=plan.template, data=cfg.data) as log:
        run = session.loaded(cfg.model, None, log, hooks)
        settings = session.settings_for(plan.template)
        prompt = PromptConfig(plan.template.name, cfg.shots, None, cfg.seed, prompts_dir=list(cfg.prompts_dir))
        builder = run.builder(plan.template, prompt, settings.max_new_tokens, None)
        from llmlab.backends.hf import HFLM

        if not isinstance(run.lm, HFLM):  # (plan.prepare refuses other backends first)
            raise UsageError("llmlab tune trains --backend hf models")
        train = examples(run.lm, builder, plan.template, plan.target, plan.train)
        held = examples(run.lm, builder, plan.template, plan.target, plan.held_out)
        saver = checkpoint.Saver(cfg, plan, run, builder.options.chat)
        return _loop(cfg, saver, train, held, hooks, log)


LOGGED = ("method", "k", "seed", "train_rows", "held_out_rows", "settings", "trainable_params", "train_seconds",
          "train_cpu_seconds", "steps_done", "best_step", "held_out_loss", "held_out_accuracy", "last_train_loss", "status")


def logged(record: Record, folder: str, log: Union[Run, NoRun]) -> Record:
    """The run log's metrics of a training: its record's numbers and where the adapter is."""
    numbers: dict[str, object] = dict(record)
    log.metrics({"adapter": folder, **{k: numbers.get(k) for k in LOGGED}})
    return record


def _loop(cfg: TuneConfig, saver: checkpoint.Saver, train: list[Example], held: list[Example], hooks: Hooks,
          log: Union[Run, NoRun]) -> Record:
    import torch

    from llmlab.backends.trainable import LEARNING_RATES

    model = saver.start()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr or LEARNING_RATES[cfg.method], weight_decay=0.0)
    model.train(True)
    order, stale, started, cpu = batches(len(train), cfg.batch_size, cfg.seed), 0, time.perf_counter(), time.process_time()
    sigterm = SigtermAsExit()  # SIGTERM (a kill, a scheduler's stop) keeps the checkpoint as Ctrl-C does
    sigterm.install()
    with hooks.progress(cfg.steps, f"tuning {cfg.method}") as bar:
        try:
            for step in range(1, cfg.steps + 1):
                value, _ = loss(model, [train[i] for i in next(order)])
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                saver.progress(step, value.item(), time.perf_counter() - started, time.process_time() - cpu)
                bar.advance(1)
                bar.describe(f"tuning {cfg.method}, loss {value.item():.3f}")
                if held and (step % cfg.eval_every == 0 or step == cfg.steps):
                    score = held_out_score(model, held, cfg.batch_size)
                    if saver.better(score):
                        stale = 0
                        saver.save(step)
                    else:
                        stale += 1
                    hooks.info(saver.line(step, value.item(), score))
                    if stale >= cfg.patience:
                        return logged(saver.finish("early stopping"), cfg.output, log)
            if not held:
                saver.save(cfg.steps)
            return logged(saver.finish("all steps"), cfg.output, log)
        except (KeyboardInterrupt, SystemExit) as stop:
            if isinstance(stop, KeyboardInterrupt) or stop.code == SIGTERM_EXIT:
                logged(saver.finish("interrupted"), cfg.output, log)
            raise
        finally:
            sigterm.restore()
