"""HFLM's see-inside methods: the next token's logits (`llmlab next`), mean-pooled sentence vectors
(similar-hidden shot selection) and the model facts they need. Callers above the boundary use them
through the LM interface and never touch the torch model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase
    from llmlab.backends.hfutil import Model

    from llmlab.backends.base import Vector


def num_layers(model: Model) -> int | None:
    """Transformer layers the hidden states come from (the decoder's, for T5); None if unsaid."""
    config = model.config
    config = getattr(config, "get_text_config", lambda **k: config)(decoder=True)
    for name in ("num_decoder_layers", "num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def next_logits(model: Model, device: str, encoder_decoder: bool, prompt: Sequence[int],
                context: Sequence[int]) -> torch.Tensor:
    """Raw logits over the vocabulary (a float32 CPU tensor) for the token after `context`.
    Decoder-only: `context` is the whole sequence; encoder-decoder: `prompt` feeds the encoder and
    `context` is the decoder's input so far."""
    import torch

    with torch.inference_mode():
        if encoder_decoder:
            out = model(input_ids=torch.tensor([list(prompt)], device=device),
                        decoder_input_ids=torch.tensor([list(context)], device=device))
        else:
            out = model(input_ids=torch.tensor([list(context)], device=device))
    return out.logits[0, -1].float().cpu()


def embed(model: Model, tokenizer: PreTrainedTokenizerBase, device: str, encoder_decoder: bool,
          texts: Sequence[str], batch_size: int = 32, max_tokens: int = 256) -> Vector:
    """(len(texts) x hidden) float32 numpy array: each text's last hidden states (the encoder's, for
    T5), mean-pooled over its first `max_tokens` tokens and L2-normalized."""
    import numpy as np
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [tokenizer.pad_token_id or 0]
           for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(ids), 0), dtype=np.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body = model.get_encoder() if encoder_decoder else model
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        # Right padding: the mask keeps pad positions out of the mean (and, causally, out of attention).
        input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch], device=device)
        with torch.inference_mode():
            hidden = body(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            last = (hidden.encoder_last_hidden_state if hasattr(hidden, "encoder_last_hidden_state")
                    else hidden.hidden_states[-1]).float()  # (batch, width, hidden)
        pooled = (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
        pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(ids), pooled.shape[1]), dtype=np.float32)
        out[batch] = pooled
    return out
