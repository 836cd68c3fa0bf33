"""The command line: the app (llmlab.commands.app) with every command module's commands on it, in
--help's order. Each command parses its options into a typed config (llmlab.core.config) and calls one
library function. A command's module is imported, and its options built, only when it runs (or help
lists it)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from llmlab.commands.app import app, defer

if TYPE_CHECKING:
    import typer

# Each command and the module whose register(app) adds it, in --help's order: commands, then the
# sub-apps (typer lists those last). tests/test_cli_lazy.py holds this to what the modules register.
COMMANDS = {
    "generate": "run_cmd", "classify": "run_cmd", "eval": "eval_cmd", "optimize": "optimize_cmd",
    "models": "prompt_cmd", "compare": "compare_cmd", "report": "runs_cmd", "tokenize": "learn_cmd",
    "info": "learn_cmd", "next": "learn_cmd", "lab": "learn_cmd", "tune": "tune_cmd", "serve": "serve_cmd",
    "prompt": "prompt_cmd", "runs": "runs_cmd",
}


def _register(module: str) -> Callable[[typer.Typer], None]:
    return lambda target: importlib.import_module(f"llmlab.commands.{module}").register(target)


for _name, _module in COMMANDS.items():
    defer(_name, _register(_module))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
