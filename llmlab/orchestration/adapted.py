"""Adapters (`llmlab tune`'s folders) inside the library entry points: the prompts an adapter was
trained on become the defaults of the commands that run it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmlab.core.config import ModelConfig, PromptConfig


def adapters_in(model: ModelConfig) -> bool:
    from llmlab.backends import adapters

    return adapters.split(model.spec)[1] is not None


def adapter_defaults(model: ModelConfig, prompt: PromptConfig, template: Any,
                     hooks: Any) -> tuple[ModelConfig, PromptConfig]:
    """With an adapter, the prompts it was trained on: its shots and chat mode (unless --shots and
    --chat are given), and a word when the template is not the one it was trained with."""
    from llmlab.backends import adapters

    folder = adapters.split(model.spec)[1]
    if folder is None:
        return model, prompt
    record = adapters.read_record(folder)
    if template is not None and record.get("template") not in (None, template.name):
        hooks.warn(f"adapter '{folder}' was trained with template '{record.get('template')}', "
                   f"not '{template.name}'")
    if model.chat is None and record.get("chat") is not None:
        model = replace(model, chat="on" if record["chat"] else "off")
    return model, (replace(prompt, shots=record.get("shots", 0)) if prompt.shots is None else prompt)
