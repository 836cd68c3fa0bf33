"""Attention over a shared prefix: a batch of rows that all continue ONE cached prefix attends to
that prefix's keys and values without copying them per row.

The copying way (prefix_cache.extend) repeats the prefix's KV cache for every row of every batch
and lets forward() append each row's keys to its copy: rows x layers x prefix tokens of copies.
Here the model runs on the rows' own tokens only, as if there were no cache; each attention layer
is handed the prefix's keys and values [1, kv_heads, P, head_dim] and splits attention in two:

  prefix part: every query of every row against the ONE prefix: its keys and values are broadcast
               over the batch with expand (a stride-0 view that the attention kernel reads in place);
  own part:    each row's queries against its own keys, under the causal + padding mask.

Each part returns its output and the log of its exponential sum (lse); one softmax over both is
out = out_p * exp(lse_p - lse) + out_o * exp(lse_o - lse), lse = logaddexp(lse_p, lse_o): the same
arithmetic as one attention over the whole row, so scores match the full forward pass to float
rounding. On a CPU both parts run in torch's fused flash-attention kernel (which returns lse).

The model's own attention modules do everything else (projections, rotary positions, scaling,
heads); only the attention function is swapped, through transformers' AttentionInterface, for the
duration of one forward call. Families whose attention is exactly softmax(q k^T * scaling + mask) v
with no sliding window, soft-capping or sinks are listed in SUPPORTED; others keep the copying path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch
    from llmlab.backends.hfutil import Model
    from transformers.cache_utils import DynamicCache

    from llmlab.backends.prefix_cache import ForwardArg

# model_type values whose attention modules call ALL_ATTENTION_FUNCTIONS with (module, query, key,
# value, mask, scaling=...) and pass forward()'s extra keyword arguments through (checked against
# transformers 5.x's modeling_llama.py and modeling_gpt2.py; tests/test_shared_prefix.py).
SUPPORTED = {"llama", "gpt2"}
NAME = "llmlab_shared_prefix"  # the attention implementation registered with transformers
KWARG = "llmlab_prefix"  # the forward() keyword that carries the prefix to every attention call
FUSED = True  # on a CPU, both parts run in torch's fused flash-attention kernel (tests turn it off)


@dataclass
class Prefix:
    """The keys and values of a cached prefix, per layer, each [1, kv_heads, past, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    past: int


def supported(model: Model) -> bool:
    config = model.config
    return (getattr(config, "model_type", None) in SUPPORTED and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "add_cross_attention", False))


def from_cache(cache: DynamicCache, past: int) -> Prefix:
    """The per-layer keys and values of a DynamicCache (views: nothing is copied)."""
    from transformers.cache_utils import CacheLayerMixin

    layers = []
    for layer in cache.layers:
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise ValueError("shared_prefix: the cache has a layer without keys and values")
        layers.append((layer.keys, layer.values))
    return Prefix(layers, past)


def forward_kwargs(prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, ForwardArg | Prefix]:
    """forward() keyword arguments for left-padded rows [B, T] that continue `prefix`.

    - Position ids count real tokens only and start right after the prefix (left padding must not
      shift them); pad positions are clamped to a valid index (their outputs are ignored).
    - attention_mask is the rows' own part only, ready-made ([B, 1, T, T] bool, True = attend:
      causal, and not onto a row's left padding); transformers passes a 4D mask through unchanged.
      A padding position also sees itself, so that no query is left with no key in either part
      (its output is ignored; no real token ever sees a padding position).
    - No cache: the rows' keys are not kept (scoring needs no next step).
    """
    import torch

    width = ids.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=ids.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=ids.device)
    own = causal[None, None] & (mask.bool()[:, None, None, :] | itself)
    # Always given (without a cache, the model would count from 0): SUPPORTED families take them,
    # also through a wrapper whose forward() passes **kwargs on (a PEFT model with a LoRA adapter).
    positions = prefix.past + (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": own, "position_ids": positions, "use_cache": False, KWARG: prefix}


@contextmanager
def active(model: Model) -> Iterator[None]:
    """Route the model's attention through attention() for the calls inside (then restore it)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor, scaling: float | None = None, dropout: float = 0.0,
              **kwargs: object) -> tuple[torch.Tensor, None]:
    """softmax over [prefix keys, own keys] for query [B, H, T, D], key/value [B, KV, T, D] (the
    rows' own), attention_mask [B, 1, T, T] bool; returns [B, T, H, D] as transformers' functions do."""
    import torch

    prefix = kwargs[KWARG]
    layer = getattr(module, "layer_idx")  # every attention module of SUPPORTED families has it
    assert isinstance(prefix, Prefix) and isinstance(layer, int)
    pk, pv = prefix.layers[layer]  # [1, KV, P, D]
    batch, heads, width, dim = query.shape
    kv = key.shape[1]
    group = heads // kv  # query heads per key/value head (grouped-query attention)
    scaling = dim**-0.5 if scaling is None else scaling
    # The G query heads of one key/value head side by side on the query axis: [B, KV, G*T, D].
    q = query.reshape(batch, kv, group, width, dim).reshape(batch, kv, group * width, dim)
    # Prefix part: the one prefix, broadcast over the batch (expand: a view, never copied).
    out_p, lse_p = part(q, pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1), None, scaling)
    # Own part: each row against its own keys, causal and not onto its padding.
    mask = attention_mask[:, :, None].expand(batch, 1, group, width, width).reshape(batch, 1, group * width, width)
    out_o, lse_o = part(q, key, value, mask, scaling)
    # One softmax over both: each part's output weighted by its share of the total exponential sum,
    # the prefix's share exp(lse_p) / (exp(lse_p) + exp(lse_o)) = sigmoid(lse_p - lse_o).
    share = torch.sigmoid(lse_p - lse_o)[..., None]
    out = torch.lerp(out_o.float(), out_p.float(), share).to(query.dtype).view(batch, kv, group, width, dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, width, heads, dim), None


def part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scaling) v, logsumexp(q k^T * scaling)) over the allowed keys (mask: bool,
    True = attend; every query must see at least one key) for [B, KV, L, D] queries and [B, KV, S,
    D] keys/values. On a CPU one fused kernel (torch's flash attention, which returns the
    logsumexp too, and reads a stride-0 batch in place); elsewhere the plain arithmetic in float32."""
    import torch

    if FUSED and query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                              attn_mask=bias, scale=scaling)
        return out, lse.float()
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), value.float()), lse
