"""A loaded model made trainable with a PEFT adapter (LoRA, IA3 or prompt tuning): the forward pass
with gradients that `llmlab tune` (llmlab.tuning) trains through, and saving the adapter. Rows are
(context ids, continuation ids) exactly as HFLM.encode_pairs splits them for scoring, so training
sees the tokens classify scores. torch and peft are imported inside functions only."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from llmlab.core.errors import UsageError

if TYPE_CHECKING:
    import peft
    import torch
    from llmlab.backends.hfutil import Model

    from llmlab.backends.hf import HFLM

# Each method's PEFT settings and default learning rate (AdamW). LoRA on the attention and MLP
# projections (the names of Llama/SmolLM2, GPT-2 and T5 layers); IA3 scales keys, values and the
# MLP's down projection as in T-Few; prompt tuning learns `virtual_tokens` input embeddings.
LEARNING_RATES = {"lora": 1e-3, "ia3": 3e-3, "prompt": 3e-2}
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # llama
                 "c_attn", "c_proj", "c_fc",  # gpt2
                 "q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]  # t5
_IA3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        "t5": (["k", "v", "wo"], ["wo"])}


@dataclass
class AdapterSettings:
    method: str = "lora"
    rank: int = 8
    alpha: int = 16
    virtual_tokens: int = 20


def _present(model: Model, names: Sequence[str]) -> list[str]:
    """The module names of `names` that the model has (PEFT refuses a target it can't find)."""
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    full = [n for n, _ in model.named_modules()]
    return [t for t in names if t in leaves or any(f.endswith("." + t) for f in full)]


def peft_config(model: Model, settings: AdapterSettings) -> peft.PeftConfig:
    import peft

    kind = getattr(model.config, "model_type", "")
    task = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if settings.method == "lora":
        return peft.LoraConfig(task_type=task, r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                               target_modules=_present(model, _LORA_TARGETS))
    if settings.method == "ia3":
        targets, feedforward = _IA3["t5" if "t5" in kind else "gpt2" if kind == "gpt2" else "llama"]
        targets = _present(model, targets)
        return peft.IA3Config(task_type=task, target_modules=targets,
                              feedforward_modules=[t for t in feedforward if t in targets])
    if settings.method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=settings.virtual_tokens,
                                       prompt_tuning_init="RANDOM")
    raise UsageError(f"invalid --method '{settings.method}': choose lora, ia3 or prompt")


class Trainable:
    """The LM's model wrapped by PEFT (only the adapter's parameters train)."""

    def __init__(self, lm: HFLM, settings: AdapterSettings, seed: int):
        import peft
        import torch

        torch.manual_seed(seed)
        self.lm = lm
        self.settings = settings
        self.model = peft.get_peft_model(lm.model, peft_config(lm.model, settings))
        if hasattr(lm, "forget_prefixes"):  # its weights will change: no prefix KV kept from before
            lm.forget_prefixes()
        self.virtual = settings.virtual_tokens if settings.method == "prompt" else 0
        self.trainable, self.total = self.model.get_nb_trainable_parameters()
        self._slices = "logits_to_keep" in inspect.signature(lm.model.forward).parameters

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self, on: bool) -> None:
        self.model.train(on)

    def logprobs(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Per row, the log-probabilities of its continuation's tokens (a tensor with gradients)."""
        import torch

        from llmlab.backends.hf_score import pad_id

        if self.lm.is_encoder_decoder:
            return self._seq2seq(rows)
        pad = pad_id(self.lm.tokenizer)
        distinct: dict[tuple[int, ...], int] = {}  # single-token labels of one prompt share one input
        which = [distinct.setdefault(tuple(ctx + cont[:-1]), len(distinct)) for ctx, cont in rows]
        seqs = list(distinct)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: real tokens keep positions 0.. after the virtual ones
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        # the positions whose outputs predict a continuation token: the vocabulary projection and
        # its softmax (a fifth of the forward pass, most of its memory) run there only
        keep = sorted({self.virtual + len(ctx) - 1 + n for ctx, cont in rows for n in range(len(cont))})
        column = {position: n for n, position in enumerate(keep)} if self._slices else None
        extra = {"logits_to_keep": torch.tensor(keep, device=self.lm.device)} if column else {}
        out = self.model(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device), **extra)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        result = []
        for i, (ctx, cont) in zip(which, rows):
            start = self.virtual + len(ctx) - 1  # the position whose output predicts cont[0]
            start = column[start] if column else start  # kept positions are consecutive within a row
            steps = logp[i, start : start + len(cont)]
            result.append(steps.gather(-1, torch.tensor(cont, device=steps.device)[:, None])[:, 0])
        return result

    def _seq2seq(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        import torch

        from llmlab.backends.hf_score import pad, pad_id

        pad_with = pad_id(self.lm.tokenizer)
        start = self.lm.model.config.decoder_start_token_id
        start = pad_with if start is None else start
        enc, enc_mask = pad([ctx for ctx, _ in rows], pad_with, left=False, device=self.lm.device)
        dec, dec_mask = pad([[start] + cont[:-1] for _, cont in rows], pad_with, left=False, device=self.lm.device)
        out = self.model(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
                         decoder_attention_mask=dec_mask)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        return [logp[i, : len(cont)].gather(-1, torch.tensor(cont, device=logp.device)[:, None])[:, 0]
                for i, (_, cont) in enumerate(rows)]

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter's weights (to keep the best step's)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in state:
                    p.copy_(state[n])

    def save(self, folder: str) -> None:
        self.model.save_pretrained(folder)
