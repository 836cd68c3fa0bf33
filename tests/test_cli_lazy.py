"""The CLI builds only the command that runs (llmlab.commands.app.LlmlabGroup), and converts plain
option values without pydantic (llmlab.commands.quickparams) to exactly what typer's own conversion
gives; --help and every error stay typer's."""

from __future__ import annotations

import subprocess
import sys
from enum import Enum

import pytest
import typer.main

pytest.importorskip("typer._coercion")  # typer >= 0.27 converts with pydantic (quickparams); older typer: none of it
from typer._click.core import Context  # noqa: E402
from typer._coercion import build_runtime_param  # noqa: E402

from helpers import invoke  # noqa: E402
from llmlab.commands import quickparams  # noqa: E402
from llmlab.commands.cli import app  # noqa: E402

COMMANDS_IN_HELP = ["generate", "classify", "eval", "optimize", "models", "compare", "report", "tokenize", "info", "next",
            "lab", "tune", "serve", "prompt", "runs"]
SAMPLES = [None, "0", "1", "-3", "007", "+2", " 4", "1.5", "-0.25", "1e3", "abc", "", "auto", "AUTO", "float32",
           "jsonl", "on", 0, 3, -1, 2.5, True, ["a", "b"], ("1", "2"), "9" * 30]


def group():
    return typer.main.get_command(app)


def test_only_the_invoked_command_is_built():
    cli = group()
    cli.main(["generate", "--help"], standalone_mode=False)
    assert list(cli.commands) == ["generate"]
    assert cli.list_commands(Context(cli)) == COMMANDS_IN_HELP  # --help's order: commands, then the sub-apps


def test_the_command_table_names_what_each_module_registers():
    import importlib

    from llmlab.commands.cli import COMMANDS

    for module in set(COMMANDS.values()):
        scratch = typer.Typer()
        importlib.import_module(f"llmlab.commands.{module}").register(scratch)
        names = [i.name for i in scratch.registered_commands] + [g.name for g in scratch.registered_groups]
        assert sorted(names) == sorted(n for n, m in COMMANDS.items() if m == module), module
    assert list(COMMANDS) == COMMANDS_IN_HELP


@pytest.mark.slow
def test_a_command_imports_its_own_module_only():
    code = ("import sys\nfrom llmlab.commands import cli\nsys.argv = ['llmlab', 'generate', '--help']\ntry:\n"
            "    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('llmlab.commands.') and m.endswith('_cmd')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "['llmlab.commands.run_cmd']", result.stderr


def test_help_lists_every_command_with_its_line():
    result = invoke(["--help"])
    assert result.exit_code == 0
    for name in COMMANDS_IN_HELP:
        assert f"│ {name} " in result.stdout
    assert "Complete prompts: one from the argument or stdin" in result.stdout


def test_a_typo_still_gets_a_suggestion():
    result = invoke(["generat", "hi"])
    assert result.exit_code == 2
    assert result.stderr == "error: No such command 'generat'. Did you mean 'generate'? (see 'llmlab --help')\n"


def every_parameter():
    cli = group()
    for name in COMMANDS_IN_HELP:
        command = cli.get_command(Context(cli), name)
        subs = [command.get_command(Context(command), s) for s in command.list_commands(Context(command))] \
            if hasattr(command, "list_commands") else [command]
        for sub in subs:
            for param in sub.params:
                if hasattr(param, "type_descriptor"):
                    yield sub, param


def typer_answer(command, param, value):
    """typer's own conversion of value for param: (value,) or the error's message."""
    runtime = build_runtime_param(param.type_descriptor)
    try:
        return (runtime.coerce(value, param=param, ctx=Context(command)),)
    except Exception as exc:  # noqa: BLE001 - the message is what is compared
        return f"{type(exc).__name__}: {exc}"


def test_plain_values_convert_as_typer_converts_them():
    plain_answers = 0
    for command, param in every_parameter():
        for value in SAMPLES:
            expected = typer_answer(command, param, value)
            quick = quickparams.QuickParam(param.type_descriptor.parameter_info, param.type_descriptor.annotation,
                                           param.type_descriptor)
            param._runtime_param = None
            try:
                got = (quick.coerce(value, param=param, ctx=Context(command)),)
            except Exception as exc:  # noqa: BLE001
                got = f"{type(exc).__name__}: {exc}"
            assert got == expected and type(got[0] if isinstance(got, tuple) else got) is \
                type(expected[0] if isinstance(expected, tuple) else expected), (command.name, param.name, value)
            done = quickparams.plain(param.type_descriptor, value, Context(command))
            plain_answers += done is not quickparams._MISS
    assert plain_answers > 500  # most plain values never reach pydantic


@pytest.mark.parametrize("descriptor_type, value, expected", [
    (int, "12", 12), (int, 5, 5), (float, "0.5", 0.5), (str, "x", "x"), (list[str], ("a", "b"), ["a", "b"]),
])
def test_plain_answers_without_typer(descriptor_type, value, expected):
    from typer._coercion import TypeDescriptor
    from typer.models import OptionInfo

    done = quickparams.plain(TypeDescriptor(descriptor_type, OptionInfo(), None), value)
    assert done == expected and type(done) is type(expected)


def test_enum_members_and_names_pass():
    class Colour(Enum):
        red = "red"

    from typer._coercion import TypeDescriptor
    from typer.models import OptionInfo

    assert quickparams.plain(TypeDescriptor(Colour, OptionInfo(), None), "red") is Colour.red
    assert quickparams.plain(TypeDescriptor(Colour, OptionInfo(), None), "blue") is quickparams._MISS


@pytest.mark.slow
def test_help_and_a_command_run_import_no_pydantic():
    code = ("import sys\nfrom llmlab.commands import cli\nsys.argv = ['llmlab', 'generate', '--help']\ntry:\n"
            "    cli.main()\nexcept SystemExit:\n    pass\nprint('pydantic' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "False", result.stderr
