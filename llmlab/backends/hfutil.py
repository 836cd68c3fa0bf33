"""Two transformers helpers every loader shares: silence its logs and bars, and pick the model class
for a config (encoder-decoder or decoder-only). No llmlab imports, so the loader and the GGUF cache
can both use them."""

from __future__ import annotations

import logging
import os
from typing import Any


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


def model_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
