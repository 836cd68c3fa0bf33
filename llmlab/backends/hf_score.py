"""Scoring for HFLM: log P(continuation | context) from one forward pass per batch. Rows are
(context ids, continuation ids); the model reads context + continuation[:-1] and the outputs at
the last len(continuation) positions predict the continuation's tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from llmlab.backends.base import LLOutput, PromptScores, TokenLogprob, Tokenizer
from llmlab.core.errors import ModelError

if TYPE_CHECKING:
    import contextlib

    import torch
    from llmlab.backends.hfutil import Model
    from transformers.cache_utils import DynamicCache

    from llmlab.backends.prefix_cache import ForwardArg
    from llmlab.backends.shared_prefix import Prefix


class Scorer(Protocol):
    """What scoring needs of an HFLM (hf.py imports this module, so it cannot name HFLM here)."""

    @property
    def model(self) -> Model: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def device(self) -> str: ...
    @property
    def share_prefix(self) -> bool: ...

    def forward_params(self) -> set[str]: ...

    def cache_kwarg(self) -> str: ...


def pad_id(tokenizer: Tokenizer) -> int:
    """The id batches pad with (the loader gives a tokenizer without one its end-of-text token)."""
    if tokenizer.pad_token_id is None:
        raise ModelError("the tokenizer has neither a pad token nor an end-of-text token to pad batches with")
    return tokenizer.pad_token_id


def pad(rows: Sequence[list[int]], pad_id: int, left: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both [len(rows), longest]: rows padded with pad_id on the left (decoder-only:
    the last real token of every row ends up in the last column) or the right (encoder inputs).
    mask is 1 on real tokens, 0 on padding."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def causal(lm: Scorer, rows: Sequence[tuple[list[int], list[int]]], cache: DynamicCache | None = None, past: int = 0,
           layers: Sequence[int] | None = None) -> list[LLOutput]:
    """Decoder-only scoring of rows, optionally continuing a cached prefix of `past` tokens.
    Identical inputs run once (single-token labels of one prompt share context + [] as input).
    layers: also return each row's hidden states at its last context token (see states())."""
    import contextlib

    import torch

    from llmlab.backends import prefix_cache, shared_prefix

    seqs: dict[tuple[int, ...], int] = {}
    which = [seqs.setdefault(tuple(ctx + cont[:-1]), len(seqs)) for ctx, cont in rows]
    ids, mask = pad([list(s) for s in seqs], pad_id(lm.tokenizer), left=True, device=lm.device)
    keep = max(len(cont) for _, cont in rows)  # only the last `keep` positions' logits are needed
    params = lm.forward_params()
    route: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    kwargs: dict[str, ForwardArg | Prefix]
    if cache is not None and lm.share_prefix and shared_prefix.supported(lm.model):
        kwargs = shared_prefix.forward_kwargs(shared_prefix.from_cache(cache, past), ids, mask)
        route = shared_prefix.active(lm.model)  # attention over the one uncopied prefix
    elif cache is not None:
        kwargs = dict(prefix_cache.extend(cache, past, ids, mask, params, lm.cache_kwarg()))
    else:
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in params:  # left padding must not shift the positions of real tokens
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    with torch.inference_mode(), route:
        out = lm.model(**kwargs, output_hidden_states=bool(layers))
        logits = out.logits[:, -keep:, :]
        results = gather(logits, which, [cont for _, cont in rows], align_right=True)
        if layers:
            # A row's input is context + continuation[:-1], left-padded to width W, so its last
            # context token sits len(continuation) places from the right end.
            width = ids.shape[1]
            states(results, out.hidden_states, layers, which, [width - len(cont) for _, cont in rows])
    return results


def seq2seq(lm: Scorer, rows: Sequence[tuple[list[int], list[int]]],
            layers: Sequence[int] | None = None) -> list[LLOutput]:
    """Encoder reads each distinct context once; the decoder scores every continuation in one pass."""
    import torch

    contexts: dict[tuple[int, ...], int] = {}
    for ctx, _ in rows:
        contexts.setdefault(tuple(ctx), len(contexts))
    pad_with = pad_id(lm.tokenizer)
    enc_ids, enc_mask = pad([list(c) for c in contexts], pad_with, left=False, device=lm.device)
    start = lm.model.config.decoder_start_token_id
    start = pad_with if start is None else start
    dec_ids, dec_mask = pad([[start] + cont[:-1] for _, cont in rows], pad_with, left=False, device=lm.device)
    which = torch.tensor([contexts[tuple(ctx)] for ctx, _ in rows], device=enc_ids.device)
    with torch.inference_mode():
        encoded = lm.model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
        out = lm.model(
            encoder_outputs=(encoded.index_select(0, which),),
            attention_mask=enc_mask.index_select(0, which),
            decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask,
            output_hidden_states=bool(layers),
        )
        results = gather(out.logits, list(range(len(rows))), [cont for _, cont in rows], align_right=False)
        if layers:  # the decoder's first position (its start token) predicts the first label token
            states(results, out.decoder_hidden_states, layers, range(len(rows)), [0] * len(rows))
    return results


def states(results: list[LLOutput], hidden: Sequence[torch.Tensor], layers: Sequence[int], which: Sequence[int],
           positions: Sequence[int]) -> None:
    """Fill each result's `hidden`: the states of `layers` (indices into hidden = (embeddings, layer
    1, ..., last layer), each [B, W, D]) at row which[k], position positions[k], concatenated into
    one float32 vector [len(layers) x D]. One device->host copy for the batch."""
    import torch

    rows = torch.tensor(list(which), dtype=torch.long, device=hidden[0].device)
    cols = torch.tensor(list(positions), dtype=torch.long, device=hidden[0].device)
    picked = torch.cat([hidden[layer][rows, cols].float() for layer in layers], dim=-1).cpu().numpy()
    for result, vector in zip(results, picked):
        result.hidden = vector


def gather(logits: torch.Tensor, which: Sequence[int], conts: Sequence[list[int]], align_right: bool) -> list[LLOutput]:
    """Sum the log-probabilities of each continuation, read from row which[k] of logits [B, W, V].

    All on the device, then ONE device->host copy for the whole batch (a float() or bool() per row
    would wait for the device once per row). align_right: the continuation sits in the last
    len(cont) positions of its row (left-padded decoder-only rows), else in the first (decoder).
    """
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)  # always float32, whatever the model dtype
    width = logprobs.shape[1]
    longest = max(len(c) for c in conts)
    device = logprobs.device
    # targets/valid [R, longest]: continuation tokens, left-aligned, zero-padded; valid marks real ones.
    targets = torch.zeros((len(conts), longest), dtype=torch.long)
    valid = torch.zeros((len(conts), longest), dtype=torch.bool)
    starts = torch.zeros(len(conts), dtype=torch.long)  # where each continuation starts in its row
    for k, cont in enumerate(conts):
        targets[k, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        valid[k, : len(cont)] = True
        starts[k] = width - len(cont) if align_right else 0
    targets, valid = targets.to(device), valid.to(device)
    positions = (starts[:, None] + torch.arange(longest)[None, :]).clamp(max=width - 1).to(device)
    rows = torch.tensor(list(which), dtype=torch.long, device=device)[:, None].expand(-1, longest)
    picked = logprobs[rows, positions, targets].masked_fill(~valid, 0.0)  # [R, longest]
    best = logprobs.argmax(-1)[rows, positions]  # the greedy token at each position
    greedy = ((best == targets) | ~valid).all(-1)
    sums, flags = torch.stack([picked.sum(-1), greedy.float()]).cpu().tolist()
    return [LLOutput(s, len(c), bool(f)) for s, c, f in zip(sums, conts, flags)]


def step_logprobs(new: torch.Tensor, logits: Sequence[torch.Tensor], top: int) -> tuple[list, list, list]:
    """The log-probability of each generated token and, with top > 0, the `top` most likely tokens
    at each step, for generate()'s output.

    new: [R, T] the generated ids (R = rows x return sequences); logits: T tensors [R, V], the raw
    next-token logits of each step (before temperature/top-k/top-p: the model's own distribution).
    Rows that finished early hold padding after their end; those steps are read and ignored later.
    Returns plain lists (ONE device->host copy): chosen [R][T], top values [R][T][top], top ids.
    """
    import torch

    steps = min(len(logits), new.shape[1])
    chosen, values, ids = [], [], []
    for t in range(steps):  # one step at a time: never more than one [R, V] float32 copy alive
        lp = torch.log_softmax(logits[t].float(), dim=-1)  # [R, V], float32 whatever the model dtype
        chosen.append(lp.gather(1, new[:, t : t + 1]).squeeze(1))  # [R]: the token that was generated
        if top:
            v, i = lp.topk(top, dim=-1)  # [R, top], most likely first
            values.append(v)
            ids.append(i)
    if not steps:
        return [[] for _ in range(new.shape[0])], [], []
    picked = torch.stack(chosen, 1)  # [R, T]
    if not top:
        return picked.tolist(), [], []
    return picked.tolist(), torch.stack(values, 1).tolist(), torch.stack(ids, 1).tolist()


def prompt_tokens(lm: Scorer, rows: Sequence[list[int]], top: int) -> list[PromptScores]:
    """Decoder-only: every token of each row scored given the tokens before it, with the `top` most
    likely tokens at each position (and after the last). One forward pass; float32 log-softmax."""
    import torch

    ids, mask = pad(rows, lm.tokenizer.pad_token_id or 0, left=True, device=lm.device)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in lm.forward_params():
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        # log P = logit - logsumexp(logits): no second [B, W, V] tensor (what log_softmax would allocate)
        logits = lm.model(**kwargs).logits.float()  # [B, W, V]
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, W, 1]
        chosen = (logits[:, :-1].gather(2, ids[:, 1:, None]) - norm[:, :-1]).squeeze(2).tolist()  # [B, W-1]
        best = logits.max(dim=-1, keepdim=True) if top == 1 else logits.topk(top, dim=-1)
        values, tops = (best[0] - norm).tolist(), best[1].tolist()  # [B, W, top]
    width = ids.shape[1]
    text = lambda i: lm.tokenizer.decode([i])  # noqa: E731
    out = []
    for b, row in enumerate(rows):
        first = width - len(row)  # the row's first real position
        alts = [[(text(i), i, v) for v, i in zip(values[b][p], tops[b][p])] for p in range(first, width)]
        tokens = [TokenLogprob(text(row[k]), row[k], chosen[b][first + k - 1], alts[k - 1]) for k in range(1, len(row))]
        out.append(PromptScores(tokens, alts[-1]))
    return out
