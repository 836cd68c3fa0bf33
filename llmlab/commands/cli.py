"""The command line: the app (llmlab.commands.app) with every command module registered on it, in
--help's order. Each command parses its options into a typed config (llmlab.core.config) and calls one
library function."""

from __future__ import annotations

from llmlab.commands import compare_cmd, eval_cmd, learn_cmd, optimize_cmd, prompt_cmd, run_cmd, runs_cmd, serve_cmd, tune_cmd
from llmlab.commands.app import app, build_on_demand

for module in (run_cmd, eval_cmd, optimize_cmd, prompt_cmd, compare_cmd, runs_cmd, learn_cmd, tune_cmd, serve_cmd):
    module.register(app)
build_on_demand(app)  # each command is built when it runs (or help lists it), not all at start-up


def main() -> None:
    app()


if __name__ == "__main__":
    main()
