"""Prefix grouping and the KV prefix cache for scoring with decoder-only models.

A few-shot prompt is the same instruction and demonstrations for every item, then the item. The
tokens of that shared start are run through the model once; its keys and values (the KV cache) are
then reused by every row that starts with exactly those tokens, so each row only computes its own
tail. Exactness: the cache of tokens t[:K] is exact for a row iff the row's own tokens start with
t[:K] (causal attention: position j only sees positions <= j). Rows are tokenized as a whole (the
natural tokenization of the full prompt), so at the seam between prefix and item the tokens may
merge differently than in the prefix alone; K is therefore the number of leading tokens a row
actually shares with the prefix's tokenization, checked per row, never assumed."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Hashable, Protocol, Sequence, TypeAlias

if TYPE_CHECKING:
    import torch
    from llmlab.backends.hfutil import Model
    from transformers.cache_utils import Cache, DynamicCache

# A value passed to a model's forward(): tensors, a KV cache, flags and counts.
ForwardArg: TypeAlias = "torch.Tensor | Cache | bool | int"

# A shared start shorter than this many tokens is not worth a cache of its own.
MIN_PREFIX = 8


def shared_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share, by binary search over slice comparisons (each one
    runs in C): a[:n] == b[:n] holds for every n up to the answer and for none above it."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high - 1:  # invariant: a[:low] == b[:low], a[:high] != b[:high]
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


@dataclass
class Group:
    prefix_ids: list[int]  # the tokens whose KV cache is computed once; len = K
    members: list[int]  # request indexes whose rows start with prefix_ids (and go past it)


def plan(prefixes: Sequence[tuple[Hashable, list[int]] | None],
         rows: Sequence[tuple[list[int], list[int]]]) -> list[Group]:
    """Groups of rows that can share a cached prefix.

    prefixes[i]: (key, the prefix's own token ids) for request i, or None when it has no prefix;
    rows[i]: (context ids, continuation ids). Row i can use the first k_i prefix tokens, where k_i
    is what it shares with the prefix, at most len(context) - 1 (the last context token must stay
    in the row: its output predicts the first continuation token). For each prefix, K is chosen
    to save the most work (K x rows that reach K); rows with k_i < K are left to the plain path.
    """
    reach: dict[Hashable, list[tuple[int, int]]] = {}  # key -> [(request index, k_i)]
    tokens: dict[Hashable, list[int]] = {}
    for i, entry in enumerate(prefixes):
        if entry is None:
            continue
        key, prefix_ids = entry
        ctx, cont = rows[i]
        k = min(shared_len(ctx + cont, prefix_ids), len(ctx) - 1)
        if k >= MIN_PREFIX:
            reach.setdefault(key, []).append((i, k))
            tokens[key] = prefix_ids
    groups = []
    for key, found in reach.items():
        counts = Counter(k for _, k in found)
        best, saved, covered = 0, 0, 0
        for k in sorted(counts, reverse=True):  # rows reaching k or further, longest k first
            covered += counts[k]
            if k * covered > saved:
                best, saved = k, k * covered
        members = [i for i, k in found if k >= best]
        if len(members) >= 2:
            groups.append(Group(tokens[key][:best], members))
    return groups


def compute(model: Model, ids: list[int], device: str, cache_kwarg: str,
            forward_params: Collection[str] = ()) -> DynamicCache:
    """The KV cache of `ids` (one row), computed once: keys and values of every layer, each
    [1, kv_heads, len(ids), head_dim]. With logits_to_keep among forward's parameters, the model's
    head runs on the last position only (its logits are not used; the cache is the same)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids], device=device), use_cache=True, **{cache_kwarg: cache}, **extra)
    return cache


def extend(cache: Cache, past: int, ids: torch.Tensor, mask: torch.Tensor, forward_params: set[str],
           cache_kwarg: str) -> dict[str, ForwardArg]:
    """forward() keyword arguments for a batch of left-padded rows [B, T] that continue a cached
    prefix of `past` tokens.

    - The cache is copied and repeated per row ([1, ...] -> [B, ...]): forward() appends the rows'
      own keys and values to it, so the shared original must stay untouched for the next batch.
    - Position ids: a row's first real token sits right after the prefix, at position `past`;
      left padding must not shift it, so positions count real tokens only (cumsum of the mask)
      and pad positions are clamped to a valid index (their output is ignored).
    - The attention mask covers prefix + row: ones for the `past` cached positions (every row sees
      the whole prefix), then the row's own mask (0 on its left padding).
    """
    import copy

    import torch

    rows = ids.shape[0]
    batch_cache = copy.deepcopy(cache)
    batch_cache.batch_repeat_interleave(rows)
    kwargs: dict[str, ForwardArg] = {"input_ids": ids, cache_kwarg: batch_cache, "use_cache": True}
    if "position_ids" in forward_params:
        kwargs["position_ids"] = past + (mask.cumsum(-1) - 1).clamp(min=0)
    ones = torch.ones((rows, past), dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
    return kwargs


# ---------------------------------------------------------------- generation: a prompt's start, remembered

class _Generator(Protocol):
    """What for_generation/remember read of the backend (HFLM)."""

    model: Model
    is_encoder_decoder: bool
    reuse_prompts: bool  # False: never (a prompt-tuned model puts its virtual tokens first)
    _prefixes: OrderedDict[tuple[int, ...], DynamicCache]  # the LM's prefix memo (scoring's too)


def for_generation(lm: _Generator, rows: Sequence[list[int]], single: bool) -> DynamicCache | None:
    """The cache to generate ONE decoder-only row from (single: one sequence per prompt, no beams):
    a copy of the remembered cache that shares the most leading tokens with the row (at least
    MIN_PREFIX, at most all but the row's last token, whose output gives the first new token),
    cropped to what it shares, so the prompt's forward pass runs over its new tokens only; else a
    new empty cache that remember() keeps afterwards. None: the row runs as it always did.
    Exact for the same reason as scoring's prefixes: position j's keys and values depend only on
    tokens <= j."""
    import copy

    from transformers import DynamicCache

    supports = getattr(lm.model, "_supports_default_dynamic_cache", lambda: True)  # not rwkv, xlnet, mamba...
    if len(rows) != 1 or not single or lm.is_encoder_decoder or not lm.reuse_prompts \
            or lm.model.generation_config.cache_implementation or not supports():
        return None
    row, best, hit = rows[0], 0, None
    for key, kept in lm._prefixes.items():
        k = min(shared_len(row, list(key)), len(row) - 1)
        if k > best and _plain(kept):
            best, hit = k, key
    if hit is None or best < MIN_PREFIX:
        return DynamicCache(config=lm.model.config.get_text_config(decoder=True))  # as generate() makes it
    lm._prefixes.move_to_end(hit)
    cache = copy.deepcopy(lm._prefixes[hit])
    cache.crop(best - len(hit))  # negative: the tokens past the shared start go
    return cache


def remember(lm: _Generator, rows: Sequence[list[int]], cache: DynamicCache | None, limit: int) -> None:
    """After generating one row with `cache`: keep its prompt's keys and values, all but the last
    token's (what for_generation may reuse), among the `limit` most recent prefixes. Only plain
    layers (no sliding window or recurrent state, whose crop is not a prefix)."""
    if cache is None or len(rows[0]) - 1 < MIN_PREFIX or not _plain(cache):
        return
    keep = len(rows[0]) - 1
    cache.crop(keep - cache.get_seq_length())
    key = tuple(rows[0][:keep])
    lm._prefixes[key] = cache
    lm._prefixes.move_to_end(key)
    while len(lm._prefixes) > limit:
        lm._prefixes.popitem(last=False)


def _plain(cache: DynamicCache) -> bool:
    """Every layer keeps every position (no sliding window, no recurrent state): a crop keeps a prefix."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
