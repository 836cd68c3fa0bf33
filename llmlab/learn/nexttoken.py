"""The next-token distribution, step by step: what the model predicts, what temperature, top-k and
top-p make of it, which tokens they cut, and which token is picked (greedy or sampled).

The reshaping uses transformers' own logits processors in the order generate() applies them
(repetition penalty; then, only when sampling, temperature, top-k, top-p), so what is shown is what
`llmlab generate` draws from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, TypedDict

from llmlab.core.errors import ContextOverflowError, ModelError, UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    import torch
    from rich.console import Console
    from transformers import LogitsProcessor

    from llmlab.backends.base import LM
    from llmlab.core.settings import GenerationSettings


@dataclass
class Candidate:
    rank: int  # 1 = the most likely under the model's own distribution
    id: int
    token: str  # the vocabulary entry
    text: str  # what it decodes to
    p: float  # the model's probability, softmax of the raw logits
    p_warped: float  # after repetition penalty / temperature / top-k / top-p (0 = cut)
    cut_by: str | None  # the first processor that removed it, or None


class CandidateRecord(TypedDict):
    """A Candidate in `llmlab next -f jsonl`."""

    rank: int
    id: int
    token: str
    text: str
    p: float
    p_warped: float
    cut_by: str | None


class StepRecord(TypedDict):
    """A Step in `llmlab next -f jsonl`."""

    step: int
    context_tokens: int
    mode: str
    warpers: list[str]
    chosen: CandidateRecord
    kept: int
    vocab: int
    top: list[CandidateRecord]
    completion: str
    end: bool


@dataclass
class Step:
    step: int  # 1-based
    context_tokens: int  # tokens the prediction is conditioned on (prompt + tokens walked so far)
    top: list[Candidate]
    chosen: Candidate
    kept: int  # tokens that can still be drawn after warping (p_warped > 0)
    vocab: int
    mode: str  # greedy or sample
    completion: str  # the text walked so far, this step's token included
    end: bool = False  # the chosen token ends the text
    warpers: list[str] = field(default_factory=list)

    def to_json(self) -> StepRecord:
        return {"step": self.step, "context_tokens": self.context_tokens, "mode": self.mode,
                "warpers": self.warpers, "chosen": _record(self.chosen), "kept": self.kept, "vocab": self.vocab,
                "top": [_record(c) for c in self.top], "completion": self.completion, "end": self.end}

    @classmethod
    def from_json(cls, data: StepRecord) -> "Step":
        """to_json's dict back (`llmlab next --server` shows the server's steps)."""
        return cls(data["step"], data["context_tokens"], [Candidate(**c) for c in data["top"]],
                   Candidate(**data["chosen"]), data["kept"], data["vocab"], data["mode"], data["completion"],
                   data["end"], list(data["warpers"]))


def _record(c: Candidate) -> CandidateRecord:
    return {"rank": c.rank, "id": c.id, "token": c.token, "text": c.text, "p": c.p, "p_warped": c.p_warped,
            "cut_by": c.cut_by}


def processors(settings: GenerationSettings) -> list[tuple[str, LogitsProcessor]]:
    """(name, processor) in generate()'s order. Warpers apply only when sampling, as in generate()."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain: list[tuple[str, LogitsProcessor]] = []
    if settings.repetition_penalty != 1.0:
        chain.append((f"repetition_penalty={settings.repetition_penalty:g}",
                      RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)))
    if settings.do_sample:
        if settings.temperature != 1.0:
            chain.append((f"temperature={settings.temperature:g}", TemperatureLogitsWarper(settings.temperature)))
        if settings.top_k:
            chain.append((f"top_k={settings.top_k}", TopKLogitsWarper(settings.top_k)))
        if settings.top_p < 1.0:
            chain.append((f"top_p={settings.top_p:g}", TopPLogitsWarper(settings.top_p)))
    return chain


def warp(logits: torch.Tensor, context: torch.Tensor,
         chain: list[tuple[str, LogitsProcessor]]) -> tuple[torch.Tensor, list[str | None]]:
    """Apply the chain to one row of logits; (warped logits, for each token the name of the
    processor that cut it, None if kept)."""
    import torch

    scores = logits[None, :].float()
    cut = torch.full((logits.shape[-1],), -1, dtype=torch.long)
    for n, (_, proc) in enumerate(chain):
        scores = proc(context[None, :], scores)
        newly = torch.isinf(scores[0]) & (scores[0] < 0) & (cut < 0)
        cut[newly] = n
    names = [chain[i][0] if i >= 0 else None for i in cut.tolist()]
    return scores[0], names


def walk(lm: LM, text: str, chat: bool, settings: GenerationSettings, steps: int = 1, show: int = 10) -> Iterator[Step]:
    """Predict `steps` tokens after `text`, yielding each step's distribution before moving on.
    Greedy takes the most likely token (after the repetition penalty); sampling draws from the
    warped distribution with torch's generator seeded by settings.seed, as generate() does."""
    import torch

    if steps < 1 or show < 1:
        raise UsageError(f"invalid --steps {steps} / --show {show}: both must be >= 1")
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    prompt = lm.token_ids(text, chat)
    encoder_decoder = lm.is_encoder_decoder
    if lm.window and not encoder_decoder and len(prompt) + steps > lm.window:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; {steps} more do not fit the model's "
                                   f"{lm.window}-token window: shorten the prompt or use fewer --steps")
    start = lm.decoder_start_id
    if encoder_decoder and start is None:
        raise ModelError(f"model '{lm.name}' is encoder-decoder but names no decoder start token "
                         "(decoder_start_token_id in its config)")
    decoder_start = [] if start is None else [start]
    generated: list[int] = []
    chain = processors(settings)
    eos = lm.eos_ids()
    for step in range(1, steps + 1):
        # Decoder-only: the prompt and the walk so far are one sequence; encoder-decoder: the prompt
        # is the encoder's input and the decoder continues from its start token.
        context = decoder_start + generated if encoder_decoder else prompt + generated
        logits = lm.next_logits(prompt, context)
        warped, cut_by = warp(logits, torch.tensor(context), chain)
        p = torch.softmax(logits.float(), dim=-1)
        q = torch.softmax(warped, dim=-1)  # cut tokens have -inf: probability exactly 0
        if settings.do_sample:
            pick = int(torch.multinomial(q, num_samples=1))
        else:
            pick = int(torch.argmax(warped))
        order = torch.argsort(p, descending=True)
        rank = int((order == pick).nonzero()[0, 0]) + 1
        top = [_candidate(lm, r + 1, int(i), p, q, cut_by) for r, i in enumerate(order[:show].tolist())]
        generated.append(pick)
        yield Step(step, len(context) if not encoder_decoder else len(prompt) + len(context),
                   top, _candidate(lm, rank, pick, p, q, cut_by), int((q > 0).sum()), int(p.shape[0]),
                   "sample" if settings.do_sample else "greedy",
                   lm.tokenizer.decode(generated, skip_special_tokens=True), pick in eos,
                   [name for name, _ in chain])
        if pick in eos:
            return


def _candidate(lm: LM, rank: int, tid: int, p: torch.Tensor, q: torch.Tensor, cut_by: list[str | None]) -> Candidate:
    token = lm.tokenizer.convert_ids_to_tokens(tid)
    return Candidate(rank, tid, str(token), lm.tokenizer.decode([tid]), float(p[tid]), float(q[tid]), cut_by[tid])


# ---------------------------------------------------------------- showing


def bar(p: float, width: int = 12) -> str:
    """A horizontal bar of p in [0, 1] with eighth-block resolution."""
    eighths = round(p * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def render(step: Step, console: Console) -> None:
    from rich.table import Table

    from llmlab.learn.tokens import visible

    warped = bool(step.warpers)
    title = f"step {step.step}: next token after {step.context_tokens} tokens ({step.mode})"
    table = Table("#", "token", "id", "p", "", title=title, title_justify="left")
    if warped:
        table.add_column("p after " + ", ".join(step.warpers))
        table.add_column("")
    table.add_column("")
    shown = {c.id for c in step.top}
    rows = step.top + ([step.chosen] if step.chosen.id not in shown else [])
    for c in rows:
        mark = "◀ picked" if c.id == step.chosen.id else ""
        cells = [str(c.rank), repr(visible(c.text)), str(c.id), f"{c.p:.4f}", bar(c.p)]
        if warped:
            cells += [f"{c.p_warped:.4f}" if c.cut_by is None else f"cut by {c.cut_by}",
                      f"[green]{bar(c.p_warped)}[/green]"]
        table.add_row(*cells, mark, style="bold" if mark else None)
    console.print(table)
    if warped:
        console.print(f"{step.kept:,} of {step.vocab:,} tokens can be drawn; the other "
                      f"{step.vocab - step.kept:,} are cut (probability 0)")
    console.print(f"picked {repr(visible(step.chosen.text))} (rank {step.chosen.rank})"
                  + (" — end of text" if step.end else "") + f"; text so far: {step.completion!r}")
