"""Attention over a shared prefix: a batch of rows that all continue ONE cached prefix attends to
that prefix's keys and values without copying them per row.

The copying way (prefix_cache.extend) repeats the prefix's KV cache for every row of every batch
and lets forward() append each row's keys to its copy: rows x layers x prefix tokens of copies.
Here the model runs on the rows' own tokens only, as if there were no cache; each attention layer
is handed the prefix's keys and values [1, kv_heads, P, head_dim] and splits attention in two:

  prefix part: scores of every query of every row against the ONE prefix copy, computed as a
               single matmul with the batch folded into the query axis ([kv_heads, B*G*T, D] @
               [kv_heads, D, P]), so the prefix is read, never repeated;
  own part:    scores of each row's queries against its own keys, under the causal + padding mask.

Both are combined under one softmax (a shared running maximum, the two exponential sums added):
softmax([s_p, s_o]) @ [V_p; V_o] = (exp(s_p - m) @ V_p + exp(s_o - m) @ V_o) / (sum exp(s_p - m) +
sum exp(s_o - m)), m = max over both. That is the same arithmetic as one attention over the whole
row, so scores match the full forward pass to float rounding.

The model's own attention modules do everything else (projections, rotary positions, scaling,
heads); only the attention function is swapped, through transformers' AttentionInterface, for the
duration of one forward call. Families whose attention is exactly softmax(q k^T * scaling + mask) v
with no sliding window, soft-capping or sinks are listed in SUPPORTED; others keep the copying path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

# model_type values whose attention modules call ALL_ATTENTION_FUNCTIONS with (module, query, key,
# value, mask, scaling=...) and pass forward()'s extra keyword arguments through (checked against
# transformers 5.x's modeling_llama.py and modeling_gpt2.py; tests/test_shared_prefix.py).
SUPPORTED = {"llama", "gpt2"}
NAME = "llmlab_shared_prefix"  # the attention implementation registered with transformers
KWARG = "llmlab_prefix"  # the forward() keyword that carries the prefix to every attention call
FUSED = True  # on a CPU, the prefix part runs in torch's fused flash-attention kernel (tests turn it off)


@dataclass
class Prefix:
    """The keys and values of a cached prefix, per layer, each [1, kv_heads, past, head_dim]."""

    layers: list[tuple[Any, Any]]
    past: int


def supported(model: Any) -> bool:
    config = model.config
    return (getattr(config, "model_type", None) in SUPPORTED and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "add_cross_attention", False))


def from_cache(cache: Any, past: int) -> Prefix:
    """The per-layer keys and values of a DynamicCache (views: nothing is copied)."""
    return Prefix([(layer.keys, layer.values) for layer in cache.layers], past)


def forward_kwargs(prefix: Prefix, ids: Any, mask: Any, forward_params: set[str]) -> dict[str, Any]:
    """forward() keyword arguments for left-padded rows [B, T] that continue `prefix`.

    - Position ids count real tokens only and start right after the prefix (left padding must not
      shift them); pad positions are clamped to a valid index (their outputs are ignored).
    - attention_mask is the rows' own part only, ready-made ([B, 1, T, T] bool, True = attend:
      causal, and not onto a row's left padding); transformers passes a 4D mask through unchanged.
      Every query also sees the whole prefix, so no query row is ever fully masked.
    - No cache: the rows' keys are not kept (scoring needs no next step).
    """
    import torch

    width = ids.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=ids.device).tril()
    own = causal[None, None] & mask.bool()[:, None, None, :]
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": own, "use_cache": False, KWARG: prefix}
    if "position_ids" in forward_params:
        kwargs["position_ids"] = prefix.past + (mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


@contextmanager
def active(model: Any) -> Iterator[None]:
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


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
              dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """softmax over [prefix keys, own keys] for query [B, H, T, D], key/value [B, KV, T, D] (the
    rows' own), attention_mask [B, 1, T, T] bool; returns [B, T, H, D] as transformers' functions do."""
    import torch

    prefix: Prefix = kwargs[KWARG]
    pk, pv = prefix.layers[module.layer_idx]  # [1, KV, P, D]
    batch, heads, width, dim = query.shape
    kv = key.shape[1]
    group = heads // kv  # query heads per key/value head (grouped-query attention)
    scaling = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv, group, width, dim)
    # Prefix part: every query of the batch against the one prefix, the batch folded into the query
    # axis ([1, KV, B*G*T, D]); its output is already normalised, lse = log of its exponential sum.
    folded = q.permute(1, 0, 2, 3, 4).reshape(1, kv, batch * group * width, dim)
    out_p, lse_p = prefix_part(folded, pk, pv, scaling)
    rows = batch * group
    out_p = out_p.view(kv, rows, width, dim).float()
    lse_p = lse_p.view(kv, rows, width, 1).float()
    # Own part [KV, B*G, T, T]: each row against its own keys, causal and not onto its padding.
    own = torch.matmul(q, key[:, :, None].transpose(-1, -2)).float().mul_(scaling)
    own.masked_fill_(~attention_mask[:, :, None], float("-inf"))
    own = own.permute(1, 0, 2, 3, 4).reshape(kv, rows, width, width)
    own_v = value[:, :, None].expand(batch, kv, group, width, dim).permute(1, 0, 2, 3, 4)
    own_v = own_v.reshape(kv, rows, width, dim).float()  # a copy, but of the rows' own values only
    # One softmax over both: a shared maximum (finite: every query sees the prefix), sums added.
    top = torch.maximum(lse_p, own.amax(-1, keepdim=True))
    weight_p = (lse_p - top).exp_()  # the prefix's exponential sum, relative to top
    own = own.sub_(top).exp_()
    total = own.sum(-1, keepdim=True).add_(weight_p)
    out = torch.matmul(own, own_v).add_(out_p * weight_p).div_(total)
    out = out.to(query.dtype).view(kv, batch, group, width, dim).permute(1, 3, 0, 2, 4)
    return out.reshape(batch, width, heads, dim), None


def prefix_part(query: Any, key: Any, value: Any, scaling: float) -> tuple[Any, Any]:
    """(softmax(q k^T * scaling) v, logsumexp(q k^T * scaling)) for [1, KV, L, D] queries against
    [1, KV, P, D] keys/values, no mask. On a CPU one fused kernel (torch's flash attention, which
    returns the logsumexp too); elsewhere the plain arithmetic in float32."""
    import torch

    if FUSED and query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                              scale=scaling)
        return out, lse
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)
    lse = scores.logsumexp(-1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), value.float()), lse
