"""Two transformers helpers every loader shares: silence its logs and bars, and pick the model class
for a config (encoder-decoder or decoder-only). No llmlab imports, so the loader and the GGUF cache
can both use them."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate

# What the auto classes load: a PreTrainedModel with GenerationMixin (transformers' own name for it,
# defined for type checkers only).
Model: TypeAlias = "_BaseModelWithGenerate"

# The auto class that builds a model for a config.
ModelClass: TypeAlias = "type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]"


def quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not logging.getLogger("llmlab").isEnabledFor(logging.DEBUG):  # the CLI's --verbose enables DEBUG
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own tqdm bar
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_class(config: object) -> ModelClass:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
