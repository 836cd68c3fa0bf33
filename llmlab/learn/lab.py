"""`llmlab lab`: an interactive session that keeps one model loaded. Each line is a prompt (its
completion streams to stdout) or a /command that changes the settings or looks inside the model.
On a terminal prompt_toolkit reads the lines (arrow-key history, saved across sessions); piped stdin
is read as a script, one line at a time."""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from llmlab.core import console
from llmlab.core.errors import LlmlabError, UsageError
from llmlab.core.settings import GenerationSettings

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import History
    from rich.console import Console

    from llmlab.backends.base import LM
    from llmlab.core.config import ModelConfig
    from llmlab.learn.nexttoken import Step
    from llmlab.orchestration.session import Hooks
    from llmlab.prompting.templates import Template
    from llmlab.scoring.generation import Job

PROMPT = "lab> "
# /next's steps after a text: (text, templated, settings, steps, show) -> the steps (nexttoken.walk's)
Walker = Callable[[str, bool, GenerationSettings, int, int], Iterable["Step"]]


def _write(text: str) -> None:
    """The lab is a terminal program: completions stream to stdout."""
    sys.stdout.write(text)
    sys.stdout.flush()

HELP = """\
Type a prompt and press Enter: the completion streams below it.
  /set                 show the generation settings
  /set NAME VALUE      change one: temperature 0.7, top_k 40, top_p 0.9, max_new_tokens 20, sample on,
                       seed 1, repetition_penalty 1.2, num_beams 2, stop "\\n", logprobs on,
                       top_logprobs 3 (colour each token by its probability) ...
  /template NAME|off   build prompts with a template (llmlab prompt list); off for plain prompts
  /shots N             demonstrations in templated prompts
  /chat on|off|auto    wrap prompts in the model's chat template
  /show                the exact text the model saw for the last prompt
  /tokens [TEXT]       its tokens and ids (or TEXT's prompt), with the token budget for a template
  /next [TEXT]         the next-token distribution after it, reshaped by the current settings
  /save FILE.yaml      write the settings as a preset (llmlab generate --config FILE.yaml)
  /help, /quit         this text; leave (Ctrl-D works too; Ctrl-C stops a completion)"""


@dataclass
class Session:
    lm: LM
    chat_mode: str  # auto, on, off
    prompts_dir: list[str]
    preset: dict[str, object] = field(default_factory=dict)  # from --config
    overrides: dict[str, object] = field(default_factory=dict)  # from /set
    template: Template | None = None
    shots: int = 0
    last: str | None = None  # the last prompt typed
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # rebuild() sets them
    # /next's walk over the text the model sees: None = nexttoken.walk on lm (lab --server: the server's)
    walker: Walker | None = None

    @classmethod
    def start(cls, model: ModelConfig, template: str | None, shots: int, prompts_dir: list[str], config: Path | None,
              hooks: Hooks | None = None, served: Callable[[], tuple[LM, Walker]] | None = None) -> "Session":
        """model: a core.config.ModelConfig, opened through orchestration.session.Session (one road
        to a model), or by served() once the options are checked (lab --server: the served model and
        the walker of its /next); hooks: where the backend's messages go."""
        from llmlab.core import settings
        from llmlab.orchestration.session import Session as ModelSession
        from llmlab.prompting import prompts
        from llmlab.scoring import generation

        preset = settings.load_preset(config) if config else {}
        tmpl = prompts.find_template(template, prompts_dir) if template else None
        if shots < 0:
            raise UsageError(f"invalid --shots {shots}: must be >= 0")
        lm, walker = served() if served else (ModelSession(model, hooks=hooks).lm, None)
        session = cls(lm, model.chat or "", prompts_dir, preset, {}, tmpl, shots, walker=walker)
        generation.use_chat(lm.tokenizer, session.chat_mode or "auto")  # validates --chat
        session.rebuild()
        return session

    # -- state

    def rebuild(self) -> None:
        """Settings = the template's generation defaults, then --config, then /set (later wins)."""
        from llmlab.core import settings

        layers = []
        if self.template is not None and self.template.generation:
            layers.append(settings.normalize_keys(self.template.generation, f"template '{self.template.name}'"))
        self.settings = settings.build(*layers, self.preset, self.overrides)

    def use_chat(self) -> bool:
        from llmlab.scoring import generation

        mode = self.chat_mode or (self.template.chat if self.template is not None else None) or "auto"
        return generation.use_chat(self.lm.tokenizer, mode)

    def job(self, text: str) -> Job:
        """The prompt the model sees for a typed line: the template's, or the line (chat-wrapped)."""
        from llmlab.scoring import generation
        from llmlab.io import records as io
        from llmlab.prompting import prompts

        if self.template is None:
            item = io.Item(0, {"prompt": text}, "your prompt")
            return generation.plain_jobs([item], "prompt", self.lm.tokenizer, self.use_chat())[0]
        if len(self.template.fields) != 1:
            raise UsageError(f"template '{self.template.name}' has fields {', '.join(self.template.fields)}; "
                             "the lab fills one-field templates only (use llmlab generate --var)")
        options = prompts.options_for(self.template, self.shots, None, None, self.use_chat(), None, "drop-shots",
                                      self.settings.max_new_tokens)
        builder = prompts.make_builder(self.template, self.lm.tokenizer, self.lm.window, options, None, None,
                                       self.lm.is_encoder_decoder, on_warn=console.warn)
        self._builder = builder
        return generation.template_jobs(builder, [io.Item(0, {self.template.fields[0]: text}, "your prompt")])[0]

    # -- commands

    def complete(self, text: str) -> None:
        from llmlab.scoring import generation
        from llmlab.io import render
        from llmlab.backends.base import GenRequest

        self.last = text
        job = self.job(text)
        if self.settings.logprobs:  # /set logprobs on (or top_logprobs N): coloured tokens, not a stream
            output = self.lm.generate([GenRequest(job.model_text, job.chat)], self.settings)[0]
            render.token_probabilities(job, output, echo=False)
            return
        generation.run_single(self.lm, job, self.settings, echo=False, emit=_write)

    def command(self, line: str, out: Console) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        handler: dict[str, Callable[[str, Console], None]] = {
            "set": self._set, "template": self._template, "shots": self._shots, "chat": self._chat,
            "show": self._show, "tokens": self._tokens, "next": self._next, "save": self._save,
            "help": lambda _r, o: o.print(HELP, markup=False),
        }
        if name in ("quit", "exit", "q"):
            return False
        if name not in handler:
            raise UsageError(f"unknown command /{name}; /help lists them")
        handler[name](rest, out)
        return True

    def _set(self, rest: str, out: Console) -> None:
        import yaml

        from llmlab.core import settings

        if not rest:
            for key in settings.FIELDS:
                out.print(f"{key} = {getattr(self.settings, key)!r}", markup=False)
            return
        key, _, value = rest.partition(" ")
        if not value.strip():
            raise UsageError(f"/set {key} needs a value, e.g. /set temperature 0.7")
        parsed = yaml.safe_load(value)  # 0.7 -> float, 40 -> int, on/true -> True, "\n" -> newline
        change = settings.normalize_keys({key: parsed}, "/set")
        trial = dict(self.overrides, **change)
        if set(change) & {"temperature", "top_k", "top_p"} and "do_sample" not in trial:
            trial["do_sample"] = trial.get("temperature", 1.0) != 0  # as on the command line
        previous = self.overrides
        self.overrides = trial
        try:
            self.rebuild()
        except LlmlabError:
            self.overrides = previous
            raise
        for k in change:
            console.note(f"{k} = {getattr(self.settings, k)!r}" + ("" if k != "temperature" else
                         f" (sampling {'on' if self.settings.do_sample else 'off'})"))

    def _template(self, rest: str, out: Console) -> None:
        from llmlab.prompting import prompts

        if not rest:
            raise UsageError("/template needs a name (llmlab prompt list) or off")
        self.template = None if rest == "off" else prompts.find_template(rest, self.prompts_dir)
        self.rebuild()
        console.note(f"template: {self.template.name if self.template else 'off'}")

    def _shots(self, rest: str, out: Console) -> None:
        if not rest.isdigit():
            raise UsageError(f"/shots needs a whole number >= 0, not '{rest}'")
        self.shots = int(rest)
        console.note(f"shots: {self.shots}")

    def _chat(self, rest: str, out: Console) -> None:
        from llmlab.scoring import generation

        generation.use_chat(self.lm.tokenizer, rest)  # validates: auto, on (needs a template), off
        self.chat_mode = rest
        console.note(f"chat: {rest} ({'on' if self.use_chat() else 'off'} for this model)")

    def _text_for(self, rest: str) -> str:
        text = rest or self.last
        if text is None:
            raise UsageError("no prompt yet: type one first, or give the text after the command")
        return text

    def _show(self, rest: str, out: Console) -> None:
        out.print(self.job(self._text_for(rest)).model_text, markup=False, highlight=False)

    def _tokens(self, rest: str, out: Console) -> None:
        from llmlab.io import records as io
        from llmlab.learn import tokens

        text = self._text_for(rest)
        job = self.job(text)
        if self.template is not None:
            _, toks, budget = tokens.budget(self._builder, io.Item(0, {self.template.fields[0]: text}, "your prompt"),
                                            self.settings.max_new_tokens)
        else:
            toks, budget = tokens.tokenize(self.lm.tokenizer, job.model_text, add_special_tokens=not job.chat), None
        tokens.render(toks, out)
        window = f" of {self.lm.window}" if self.lm.window else ""
        out.print(f"\n{len(toks)} tokens{window}")
        if budget:
            tokens.render_budget(budget, out)

    def _next(self, rest: str, out: Console) -> None:
        from llmlab.learn import nexttoken

        job = self.job(self._text_for(rest))
        walk = self.walker or functools.partial(nexttoken.walk, self.lm)
        for step in walk(job.model_text, job.chat, self.settings, 1, 10):
            nexttoken.render(step, out)

    def _save(self, rest: str, out: Console) -> None:
        import dataclasses

        import yaml

        if not rest:
            raise UsageError("/save needs a file name, e.g. /save preset.yaml")
        values = {k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None and v != []}
        try:
            Path(rest).expanduser().write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write '{rest}': {exc.strerror}") from None
        console.note(f"saved {len(values)} settings to {rest} (use: llmlab generate --config {rest})")

    # -- the loop

    def handle(self, line: str, out: Console) -> bool:
        """One input line; False means quit. Errors print one line and the session goes on."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self.command(line, out)
            self.complete(line)
        except LlmlabError as exc:
            console.error(str(exc))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            console.note("(interrupted)")
        return True

    def run(self) -> None:
        from rich.console import Console

        out = Console(highlight=False, soft_wrap=True)
        if sys.stdin is None or not sys.stdin.isatty():
            for line in sys.stdin or []:
                if not self.handle(line, out):
                    return
            return
        reader = _reader()
        console.note(f"{self.lm.name} loaded. /help for commands, /quit or Ctrl-D to leave.")
        with _no_line_mode():
            while True:
                try:
                    line = reader.prompt(PROMPT)
                except KeyboardInterrupt:
                    continue  # Ctrl-C at the prompt clears the line
                except EOFError:
                    return
                if not self.handle(line, out):
                    return


@contextlib.contextmanager
def _no_line_mode() -> Iterator[None]:
    """The terminal out of line mode for the session (prompt_toolkit sets its own raw mode while it
    reads and comes back to this). In line mode the kernel keeps at most 4,095 characters of a line
    typed ahead and drops the rest: a long paste while a completion streams was cut to ~4,072.
    Without it a paste waits whole until the next prompt reads it; keys typed meanwhile don't echo
    into the completion, and Ctrl-C still interrupts."""
    try:
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd, termios.TCSANOW)
    except Exception:  # noqa: BLE001 - no termios, or not a terminal we can set: left as it is
        yield
        return
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _reader() -> PromptSession[str]:
    """A prompt_toolkit session with history kept in the llmlab cache folder."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from llmlab.backends import models

    path = models.cache_root() / "lab-history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history: History = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    return PromptSession(history=history)
