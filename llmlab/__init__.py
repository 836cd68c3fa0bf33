"""llmlab: a command-line prompt-engineering lab over Hugging Face transformers."""

__version__ = "0.1.0"
