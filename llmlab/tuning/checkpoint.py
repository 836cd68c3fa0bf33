"""The adapter folder `llmlab tune` writes: PEFT's files plus llmlab's record (llmlab.backends.adapters
.RECORD), replaced whole at each new best step (written beside it, then renamed), so the folder is
always one complete checkpoint, whatever stops the run."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.core.config import TuneConfig
from llmlab.core.errors import UsageError

if TYPE_CHECKING:
    from llmlab.backends.adapters import Record
    from llmlab.backends.trainable import Trainable
    from llmlab.orchestration.session import Session
    from llmlab.tuning.plan import TunePlan


class Saver:
    def __init__(self, cfg: TuneConfig, plan: TunePlan, session: Session, chat: bool):
        self.cfg = cfg
        self.plan = plan
        self.lm = session.lm
        self.chat = chat
        self.model: Trainable | None = None
        self.best: tuple[float, float | None] | None = None
        self.best_step = 0
        self.saved_step = 0
        self.steps_done = 0
        self.last_loss: float | None = None
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def start(self) -> Trainable:
        from llmlab.backends.hf import HFLM
        from llmlab.backends.trainable import AdapterSettings, Trainable

        c = self.cfg
        if not isinstance(self.lm, HFLM):  # (plan.prepare refuses other backends first)
            raise UsageError("llmlab tune trains --backend hf models")
        self.model = Trainable(self.lm, AdapterSettings(c.method, c.rank, c.alpha, c.virtual_tokens), c.seed)
        return self.model

    def progress(self, step: int, loss: float, seconds: float, cpu_seconds: float = 0.0) -> None:
        """After a step: its loss, the wall seconds so far and the CPU seconds (every thread's: what
        the training cost on a shared machine, whatever else ran beside it)."""
        self.steps_done, self.last_loss, self.seconds, self.cpu_seconds = step, loss, seconds, cpu_seconds

    def better(self, score: tuple[float, float | None]) -> bool:
        """Better on the held-out rows than the best so far (the first score always is): a higher
        accuracy, ties to the lower loss, for classify templates; a lower loss for generate ones."""
        key = lambda s: (-(s[1] or 0.0), s[0])  # noqa: E731
        if self.best is not None and key(score) >= key(self.best):
            return False
        self.best = score
        return True

    def line(self, step: int, loss: float, score: tuple[float, float | None]) -> str:
        accuracy = "" if score[1] is None else f", accuracy {score[1]:.1%}"
        mark = " (best, saved)" if self.best_step == step else ""
        return (f"step {step}/{self.cfg.steps} ({self.seconds:.0f} s): train loss {loss:.4f}, held-out loss "
                f"{score[0]:.4f}{accuracy}{mark}")

    def save(self, step: int) -> None:
        """Write the adapter as it is now, with its record, in place of the folder's last one."""
        self.best_step = step
        out = Path(self.cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        fresh = out.with_name(out.name + ".writing")
        shutil.rmtree(fresh, ignore_errors=True)
        assert self.model is not None  # saved only after start()
        self.model.save(str(fresh))
        (fresh / "llmlab_adapter.json").write_text(json.dumps(self.record("training"), indent=1) + "\n")
        old = out.with_name(out.name + ".old")
        if out.exists():
            out.rename(old)
        fresh.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        self.saved_step = step

    def finish(self, why: str) -> Record:
        """The final record (in the folder when a step was saved; an interrupt before any keeps the
        adapter as it is then)."""
        out = Path(self.cfg.output)
        if not self.saved_step and self.steps_done:
            self.save(self.steps_done)
        record = self.record(why)
        if out.is_dir():
            (out / "llmlab_adapter.json").write_text(json.dumps(record, indent=1) + "\n")
        return record

    def record(self, status: str) -> Record:
        import peft

        from llmlab import __version__
        from llmlab.backends import adapters

        c, p = self.cfg, self.plan
        settings = {k: v for k, v in asdict(c).items()
                    if k in ("rank", "alpha", "virtual_tokens", "steps", "batch_size", "held_out", "eval_every",
                             "patience", "target")}
        from llmlab.backends.trainable import LEARNING_RATES

        settings["lr"] = c.lr or LEARNING_RATES[c.method]
        model = self.model
        assert model is not None  # a record is written after start()
        return {
            "base": self.lm.name, "base_shape": adapters.base_shape(model.lm), "method": c.method,
            "template": p.template.name, "task": p.template.task, "target": p.target, "shots": c.shots,
            "chat": self.chat, "data": c.data, "data_sha256": p.data_sha256, "k": c.k, "seed": c.seed,
            "train_rows": len(p.train), "held_out_rows": len(p.held_out), "settings": settings,
            "trainable_params": model.trainable, "base_params": model.total - model.trainable,
            "train_seconds": round(self.seconds, 2), "train_cpu_seconds": round(self.cpu_seconds, 2),
            "steps_done": self.steps_done, "best_step": self.best_step,
            "held_out_loss": self.best[0] if self.best else None,
            "held_out_accuracy": self.best[1] if self.best else None, "last_train_loss": self.last_loss,
            "status": status, "llmlab": __version__, "peft": peft.__version__,
        }
