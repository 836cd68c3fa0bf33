"""The Typer app every command registers on, and the pieces the commands share: the group that turns
every LlmlabError into one stderr line and an exit code (the only place that does), the library hooks
(stderr, progress, the run log), and the model and prompt options made into configs. Heavy libraries
(torch, transformers) load inside commands only."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated, Callable, ClassVar, Mapping, Optional

import typer
from typer.core import TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click; its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exceptions  # type: ignore[no-redef]  # the same module, older home

from llmlab import __version__
from llmlab.commands import quickparams  # noqa: F401 - option values converted without pydantic where plain
from llmlab.core import console
from llmlab.core.config import Overflow, value
from llmlab.core.errors import Interrupted, LlmlabError, UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from typer._click.core import Command, Context  # click's, as typer (>= 0.20) vendors them

    from llmlab.orchestration.session import Hooks


_display_type = TyperOption.display_type_rich


def _no_flag_types(self: TyperOption, ctx: Context) -> Optional[str]:
    """--help: no `<bool>` label on on/off flags (they take no value)."""
    return None if getattr(self, "is_flag", False) else _display_type(self, ctx)


TyperOption.display_type_rich = _no_flag_types  # type: ignore[method-assign]


_ARGS: list[str] = []  # this run's command line after `llmlab`: the run log records it, eval --processes re-runs it


def command_line() -> list[str]:
    """This run's arguments after `llmlab` (set by LlmlabGroup.main): read, never assigned, elsewhere."""
    return list(_ARGS)


def _stdout_is_null() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):
        return False


def _drop_stdout() -> None:
    """stdout's reader has gone (a closed pipe): what is still buffered goes to /dev/null, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _closed_pipe_exit(exc: SystemExit, was_null: bool) -> int:
    """0 for the exit typer or rich make on a closed stdout pipe (--help, a table piped to head);
    any other SystemExit goes on."""
    piped_away = type(sys.stdout).__name__ == "PacifyFlushWrapper" or (  # typer's EPIPE exit
        exc.code == 1 and not was_null and _stdout_is_null())  # rich's: stdout moved to /dev/null, exit 1
    if not piped_away:
        raise exc
    _drop_stdout()
    return 0


class LlmlabGroup(TyperGroup):
    """Runs commands and maps every failure to one stderr line and an exit code."""

    def invoke(self, ctx: Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `llmlab ... | head -1`: the reader is gone, nothing is wrong (exit 0)
            _drop_stdout()
            return None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        debug = os.environ.get("LLMLAB_DEBUG", "") not in ("", "0")
        global _ARGS
        _ARGS = [str(a) for a in (sys.argv[1:] if args is None else args)]  # eval --processes re-runs them
        was_null = _stdout_is_null()
        try:
            code = super().main(args, prog_name or "llmlab", complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()  # bare `llmlab` or `llmlab prompt`: print the help
            code = exc.exit_code
        except click_exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            console.error(f"{exc.format_message().replace('Value error, ', '')}{hint}")
            code = exc.exit_code
        except click_exceptions.ClickException as exc:
            console.error(exc.format_message())
            code = exc.exit_code
        except typer.Abort:
            code = 130
        except SystemExit as exc:
            code = _closed_pipe_exit(exc, was_null)
        except Interrupted as exc:  # Ctrl-C or SIGTERM with records kept: how many, and how to finish
            console.stderr().print(str(exc), markup=False)
            code = exc.exit_code
        except LlmlabError as exc:
            if debug:
                raise
            console.error(str(exc))
            code = exc.exit_code
        except BrokenPipeError:  # `llmlab ... | head -1`: the reader is gone, nothing is wrong
            _drop_stdout()
            code = 0
        except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if debug:
                raise
            console.error(f"{type(exc).__name__}: {exc} (set LLMLAB_DEBUG=1 for the traceback)")
            code = 1
        try:
            sys.stdout.flush()  # here, not at exit, where a closed pipe would print "Exception ignored"
        except BrokenPipeError:
            _drop_stdout()
        except (OSError, ValueError):
            pass
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code

    # Commands are built (their options read, their Typer parameters made) only when one runs or help
    # lists them: a one-token `generate --server` should not pay for the other commands' ~40 options each.
    deferred: ClassVar[Mapping[str, Callable[[], Command]]] = {}  # name -> builder, in --help's order

    def list_commands(self, ctx: Context) -> list[str]:
        return [*self.commands, *(name for name in self.deferred if name not in self.commands)]

    def get_command(self, ctx: Context, cmd_name: str) -> Optional[Command]:
        if cmd_name not in self.commands and cmd_name in self.deferred:
            self.commands[cmd_name] = self.deferred[cmd_name]()
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[Optional[str], Optional[Command], list[str]]:
        if args and args[0] not in self.deferred:  # a typo: typer suggests from self.commands, so build them all
            for name in self.deferred:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


def defer(name: str, register: Callable[[typer.Typer], None]) -> None:
    """Add the command (or sub-app) `name` to the app, built when it runs or help lists it: only then
    is register(app) called (its module imported) on a scratch app, and `name` taken from there and
    built with this app's settings. cli.py defers every command; typer would build them all up front."""

    def build() -> Command:
        scratch = typer.Typer()
        register(scratch)
        for info in scratch.registered_commands:
            assert info.callback is not None  # typer's command decorator always sets it
            if (info.name or typer.main.get_command_name(info.callback.__name__)) == name:
                return typer.main.get_command_from_info(info, pretty_exceptions_short=app.pretty_exceptions_short,
                                                        rich_markup_mode=app.rich_markup_mode)
        group = next(group for group in scratch.registered_groups if group.name == name)
        return typer.main.get_group_from_info(group, pretty_exceptions_short=app.pretty_exceptions_short,
                                              suggest_commands=app.suggest_commands,
                                              rich_markup_mode=app.rich_markup_mode)

    _DEFERRED[name] = build


_DEFERRED: dict[str, Callable[[], Command]] = {}  # name -> builder, in --help's order
LlmlabGroup.deferred = _DEFERRED


app = typer.Typer(
    cls=LlmlabGroup,
    name="llmlab",
    help="A prompt-engineering lab: generate, classify and evaluate with Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"llmlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """A prompt-engineering lab: generate, classify and evaluate with Hugging Face models.

    With no --model, everything runs offline on the embedded SmolLM2-135M-Instruct.
    """




def hooks(no_log: bool = False) -> Hooks:
    """Library callbacks that write to stderr through the console (progress only on a terminal),
    and record the run in the run log with this command line (unless --no-log / LLMLAB_LOG=0)."""
    import functools

    from llmlab.runs import runlog
    from llmlab.orchestration.session import Hooks

    # runlog.open_run with this command line and --no-log filled in (_ARGS is set before any command runs)
    open_run = functools.partial(runlog.open_run, argv=["llmlab", *_ARGS], no_log=no_log, on_warn=console.warn)

    return Hooks(progress=console.progress, warn=console.warn, info=console.info, note=console.note,
                 detail=console.detail, open_run=open_run, emit=console.emit)


def model_config(model, device, dtype, chat, device_map=None, max_memory=None, backend="hf", tensor_parallel_size=1,
                 adapter=None):
    """The model options, checked before any model time (placement options: llmlab.backends.placement);
    --adapter DIR becomes the model spec BASE+DIR, whose folder is checked here."""
    from llmlab.backends import placement
    from llmlab.core.config import ModelConfig

    if adapter or (model and "+" in model):  # adapters imports the torch side's module: only when asked
        from llmlab.backends import adapters

        model = adapters.join(model, adapter)
        if adapters.split(model)[1] is not None:
            record = adapters.read_record(adapters.split(model)[1])
            if chat is None and record.get("chat") is not None:  # the prompts it was trained on
                chat = "on" if record["chat"] else "off"
            if value(backend) == "vllm":
                raise UsageError("--adapter runs on --backend hf; vLLM loads the base model only")
    cfg = ModelConfig(model, device, value(dtype), value(chat), placement.parse_device_map(device_map),
                      placement.parse_max_memory(max_memory), value(backend), tensor_parallel_size)
    if cfg.backend == "vllm":
        from llmlab.backends import vllm

        vllm.check_options(cfg)
    else:
        placement.check(device, cfg.device_map, cfg.max_memory)
        if tensor_parallel_size != 1:
            raise UsageError("--tensor-parallel-size needs --backend vllm; with hf use --device-map auto")
    return cfg


def show_placement(cfg) -> None:
    """--dry-run: the placement --device-map (default auto) would give, on stdout; then exit."""
    from llmlab.backends import loading

    if cfg.backend == "vllm":
        raise UsageError("--dry-run shows accelerate placements (--backend hf); vLLM places models itself")
    for line in loading.placement_plan(cfg.spec, cfg.dtype, cfg.device_map or "auto", cfg.max_memory):
        print(line)
    raise typer.Exit(0)


def prompt_config(template, shots=None, selection=None, seed=None, shot_format=None, overflow=Overflow.drop_shots,
            examples=None, prompts_dir=None, var=None):
    from llmlab.core.config import PromptConfig

    return PromptConfig(template, shots, value(selection), seed, value(shot_format), value(overflow), examples,
                        list(prompts_dir or []), list(var or []))
