"""The one prompt builder: instruction, zero-, one- or few-shot demonstrations (chosen by
selection), chat formatting, and fitting the context window. Templates themselves: llmlab.prompting.templates."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Callable, Mapping, Sequence

from llmlab.core.config import plural
from llmlab.core.errors import ContextOverflowError, TemplateError, UsageError
from llmlab.core.jsontypes import JSONObject
from llmlab.io.records import Item

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM, Tokenizer
    from llmlab.prompting.retrieval import Retriever
from llmlab.prompting.templates import (  # noqa: F401 - re-exported: llmlab.prompting.prompts.find_template etc. keep working
    _QUERY_MARK, KEYS, OVERFLOW_MODES, SELECTIONS, SHOT_FORMATS, SOURCE_DIR, TASKS, Template, builtin_dir,
    check_examples, fill, find_template, list_templates, load_examples, load_template, parse_vars,
    placeholders, require_fields, scan_templates, search_dirs,
)

# this module's public names and those it re-exports from llmlab.prompting.templates (callers import them from here)
__all__ = [
    "BuildOptions", "KEYS", "OVERFLOW_MODES", "Prompt", "PromptBuilder", "SELECTIONS", "SHOT_FORMATS", "SOURCE_DIR",
    "TASKS", "Template", "builtin_dir", "check_examples", "check_shots", "fill", "find_template", "list_templates", "load_examples",
    "load_template", "make_builder", "model_view", "options_for", "parse_vars", "placeholders", "require_fields",
    "scan_templates", "search_dirs", "select_shots", "shot_order", "shots_note",
]

def shot_order(size: int, selection: str, seed: int) -> list[int]:
    """The order a pool of `size` examples is drawn in: pool order for first (and similar, which
    ranks the pool per item instead), else a seeded shuffle."""
    if selection not in SELECTIONS:
        raise UsageError(f"invalid --shot-selection '{selection}': choose {', '.join(SELECTIONS)}")
    order = list(range(size))
    if selection not in ("first", "similar", "similar-tfidf", "similar-hidden"):
        random.Random(seed).shuffle(order)
    return order


def shots_note(template: Template, shots: int, available: int) -> str | None:
    """The warning for asking more shots than the pool can give (they are cut to what there is)."""
    if shots > available:
        return (f"--shots {shots}, but template '{template.name}' has only {available} examples to show: "
                f"using {available}")
    return None


def select_shots(template: Template, pool: Sequence[Mapping[str, object]], shots: int, selection: str,
                 seed: int, exclude: AbstractSet[int] = frozenset(), order: Sequence[int] | None = None) -> list[int]:
    """Indexes into `pool` of the demonstrations for one item, never one of `exclude`.

    first: pool order; random: a seeded shuffle; balanced: round-robin over the labels (in the
    template's label order) so classes are mixed, each label's examples in seeded order.
    The draw depends only on the seed, so items that exclude nothing share the same shots.
    `order` is shot_order(...) computed once by the caller; only as much of it is read as needed.
    """
    if order is None:
        order = shot_order(len(pool), selection, seed)
    if shots <= 0:
        return []
    candidates = (i for i in order if i not in exclude)
    if selection != "balanced":
        return [i for _, i in zip(range(shots), candidates)]
    if not template.target:
        raise UsageError(f"--shot-selection balanced needs a template with a 'target' field; '{template.name}' has none")
    groups: dict[str, list[int]] = {label: [] for label in template.labels or []}
    enough = -(-shots // len(groups)) if groups else None  # ceil: what round-robin takes per label at most
    for i in candidates:
        groups.setdefault(str(pool[i][template.target]), []).append(i)
        if enough and all(len(g) >= enough for g in groups.values()):
            break  # every label can give its share: the rest of the order can't change the pick
    chosen: list[int] = []
    queues = [g for g in groups.values() if g]
    while len(chosen) < shots and queues:
        for queue in list(queues):
            if len(chosen) == shots:
                break
            chosen.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return chosen


# ---------------------------------------------------------------- building


@dataclass
class BuildOptions:
    shots: int = 0
    selection: str = "first"
    seed: int = 0
    chat: bool = False
    shot_format: str = "turns"  # with chat: demonstrations as user/assistant turns, or inline in one turn
    overflow: str = "drop-shots"
    max_new_tokens: int = 0  # room to leave in the window (decoder-only models)
    pool_is_data: bool = False  # the examples are the input file itself: leave each item out


def options_for(template: Template, shots: int | None = None, selection: str | None = None, seed: int | None = None,
                chat: bool = False, shot_format: str | None = None, overflow: str = "drop-shots",
                max_new_tokens: int = 0, default_selection: str = "first") -> BuildOptions:
    """BuildOptions with the template's defaults filled in where the caller passes None: the template's
    `shots:` (else 0; orchestration.resolve decides this for every command), balanced shots for classify templates (else
    `default_selection`), seed 0, the template's shot format (else turns)."""
    return BuildOptions(
        shots=(template.shots or 0) if shots is None else shots,
        selection=selection or template.shot_selection
        or ("balanced" if template.task == "classify" else default_selection),
        seed=0 if seed is None else seed,
        chat=chat,
        shot_format=shot_format or template.shot_format or "turns",
        overflow=overflow,
        max_new_tokens=max_new_tokens,
    )


@dataclass
class Prompt:
    """One built prompt: `text` exactly what the model sees; `plain` the same before any chat template."""

    text: str
    plain: str
    chat: bool
    answer_prefix: str  # put before a label when scoring it as the continuation
    shots: list[int]
    tokens: int
    notes: list[str] = field(default_factory=list)  # warnings: dropped shots, truncation
    # prefix: the start of `text` before the item's own input (instruction, demonstrations, chat
    # preamble): the same for every item with the same shots, so its computation can be shared.
    prefix: str = ""
    # ids: the tokenization of `text` that `tokens` counts (the one the model sees), or None.
    ids: list[int] | None = field(default=None, repr=False)

    @property
    def pieces(self) -> tuple[str, str]:
        return self.prefix, self.text[len(self.prefix) :]


def _ignore(message: str) -> None:
    """The default for a callback nobody gave: library code never prints."""


class PromptBuilder:
    """Builds every prompt of a run: one code path for generate, classify, eval and render."""

    def __init__(self, template: Template, tokenizer: Tokenizer, window: int | None, options: BuildOptions,
                 pool: list[JSONObject] | None = None, encoder_decoder: bool = False, lm: LM | None = None,
                 on_warn: Callable[[str], None] | None = None):
        if options.overflow not in OVERFLOW_MODES:
            raise UsageError(f"invalid --overflow '{options.overflow}': choose drop-shots, truncate or error")
        if options.shot_format not in SHOT_FORMATS:
            raise UsageError(f"invalid --shot-format '{options.shot_format}': choose turns or inline")
        if options.shots < 0:
            raise UsageError(f"invalid --shots {options.shots}: must be >= 0")
        self.template = template
        self.tokenizer = tokenizer
        self.window = window
        self.options = options
        if pool is None and template.examples_error:
            raise TemplateError(template.examples_error)
        self.pool = template.examples if pool is None else pool
        self.encoder_decoder = encoder_decoder
        self.lm = lm  # the loaded model, for similar-hidden (None where only the tokenizer is loaded)
        # Where warnings go (more shots than examples, a prompt's dropped shots): the CLI's console.warn;
        # library code never prints. Callers that build prompts pass each Prompt.notes here too.
        self.on_warn = on_warn or _ignore
        self._retriever: Retriever | None = None
        self._similar: dict[tuple[str, ...], list[int]] = {}  # item input -> its nearest pool rows
        check_shots(template, options.shots, self.pool)
        if options.shots > 0:
            check_examples(template, self.pool, "examples")
            note = shots_note(template, options.shots, len(self.pool) - int(options.pool_is_data))
            if note:
                self.on_warn(note)
        # Computed once per run, not per item: the draw order and an index of the pool by input text.
        self._order = shot_order(len(self.pool), options.selection, options.seed)  # validates the selection
        self._orders = {0: self._order}  # --ensemble: the draw order of each extra draw, made when needed
        self._by_input: dict[tuple[str, ...], list[int]] = {}
        for i, example in enumerate(self.pool if options.shots > 0 else []):
            self._by_input.setdefault(self._input_key(example), []).append(i)

    # -- pieces

    def _item_input(self, values: Mapping[str, object], where: str) -> str:
        return fill(self.template.input, values, where)

    def _demo(self, example: Mapping[str, object]) -> tuple[str, str]:
        target = self.template.target
        if target is None:
            raise TemplateError(f"template '{self.template.name}' has no 'target' field, so it can't show answers in shots")
        return self._item_input(example, "example"), self.template.verbalize(example[target])

    def _instruction(self, values: Mapping[str, object], where: str) -> str:
        return fill(self.template.instruction, values, where) if self.template.instruction else ""

    def compose(self, values: Mapping[str, object], shots: list[int], where: str,
                query: str | None = None) -> tuple[str, str]:
        """(model text, plain text) for an item with these demonstrations."""
        t = self.template
        demos = [self._demo(self.pool[i]) for i in shots]
        query = self._item_input(values, where) if query is None else query
        instruction = self._instruction(values, where)
        parts = ([instruction] if instruction else []) + [q + t.answer_prefix + a for q, a in demos] + [query]
        plain = t.separator.join(parts)
        if not self.options.chat:
            return plain, plain
        if self.options.shot_format == "inline" or not demos:
            messages = [{"role": "user", "content": plain}]
        else:
            messages = []
            for n, (q, a) in enumerate(demos):
                content = instruction + t.separator + q if n == 0 and instruction else q
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": query})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, plain

    def count(self, text: str) -> int:
        """Tokens of `text` as the model sees it; the ids of the last text counted are kept."""
        ids = list(self.tokenizer(text, add_special_tokens=not self.options.chat)["input_ids"])
        self._counted = (text, ids)
        return len(ids)

    def budget(self, extra_tokens: int = 0) -> int | None:
        """Tokens the prompt may use: the window, less room for new tokens on decoder-only models."""
        if self.window is None:
            return None
        room = 0 if self.encoder_decoder else self.options.max_new_tokens + extra_tokens
        return self.window - room

    # -- the whole prompt

    def exclusions(self, item: Item) -> set[int]:
        """Pool entries that are this item: the same row when the pool is the data, or equal inputs."""
        skip = {item.index} if self.options.pool_is_data and item.index < len(self.pool) else set()
        return skip | set(self._by_input.get(self._input_key(item.fields), ()))

    def _input_key(self, values: Mapping[str, object]) -> tuple[str, ...]:
        return tuple(str(values.get(k)) for k in self.template.fields)

    # -- choosing the demonstrations

    @property
    def similar(self) -> bool:
        return self.options.selection.startswith("similar")

    def _retrieval_text(self, values: Mapping[str, object]) -> str:
        return " ".join(self._input_key(values))

    def prepare(self, items: Sequence[Item]) -> None:
        """With similar selection, find the nearest pool rows of many items at once (one batched
        similarity computation instead of one per item); build() then only looks them up."""
        if not self.similar or self.options.shots <= 0:
            return
        from llmlab.prompting import retrieval

        if self._retriever is None:
            kind = self.options.selection.removeprefix("similar").lstrip("-") or retrieval.DEFAULT
            texts = [self._retrieval_text(e) for e in self.pool]
            self._retriever = retrieval.make_retriever(kind, texts, self.lm)
        todo = {self._input_key(i.fields): i for i in items if self._input_key(i.fields) not in self._similar}
        if not todo:
            return
        keys = list(todo)
        sims = self._retriever.similarities([" ".join(k) for k in keys])
        picked = retrieval.nearest(sims, self.options.shots, [self.exclusions(todo[k]) for k in keys])
        self._similar.update(zip(keys, picked))

    def choose_shots(self, item: Item, draw: int = 0) -> list[int]:
        """The demonstrations for one item in draw `draw` (--ensemble): draw d of random or balanced
        selection draws with seed + d; first and similar keep their set and shuffle its order."""
        o = self.options
        if self.similar and o.shots > 0:
            self.prepare([item])
            shots = list(self._similar[self._input_key(item.fields)])
        else:
            key = 0 if o.selection == "first" else draw  # first has one order, whatever the draw
            seed = o.seed + key
            if key not in self._orders:
                self._orders[key] = shot_order(len(self.pool), o.selection, seed)
            order = self._orders[key]
            shots = select_shots(self.template, self.pool, o.shots, o.selection, seed, self.exclusions(item), order)
        if draw and (self.similar or o.selection == "first"):
            random.Random(o.seed * 1000 + draw).shuffle(shots)  # another order of the same demonstrations
        return shots

    def build(self, item: Item, extra_tokens: int = 0, shots: list[int] | None = None, draw: int = 0) -> Prompt:
        """The prompt for one item; `shots` forces the demonstrations (for content-free inputs);
        `draw` picks another draw of demonstrations (--ensemble)."""
        o = self.options
        if shots is None:
            shots = self.choose_shots(item, draw)
        text, plain = self.compose(item.fields, shots, item.source)
        tokens = self.count(text)
        budget = self.budget(extra_tokens)
        notes: list[str] = []
        if budget is not None and self.window is not None and tokens > budget:  # budget is None iff window is
            need = f"{tokens} tokens" + ("" if self.encoder_decoder else f" + {self.window - budget} new")
            if o.overflow == "error":
                raise ContextOverflowError(
                    f"{item.source}: the prompt needs {need}, over the model's {self.window}-token window; "
                    "use fewer --shots, a smaller --max-new-tokens, or --overflow drop-shots|truncate"
                )
            before = tokens
            if o.overflow == "drop-shots":
                kept = list(shots)
                while kept and tokens > budget:
                    kept.pop()
                    text, plain = self.compose(item.fields, kept, item.source)
                    tokens = self.count(text)
                if len(kept) < len(shots):
                    notes.append(f"{item.source}: prompt of {before} tokens did not fit the {self.window}-token "
                                 f"window; dropped {len(shots) - len(kept)} of {plural(len(shots), 'shot')} ({tokens} tokens now)")
                shots = kept
            if tokens > budget:
                text, plain, tokens, notes_ = self._truncate(item, shots, budget, tokens)
                notes += notes_
        marked, _ = self.compose(item.fields, shots, item.source, query=_QUERY_MARK)
        split = marked.index(_QUERY_MARK)
        if text[:split] != marked[:split]:
            split = 0  # the query changed text before it (a chat template that rewrites content)
        counted = getattr(self, "_counted", None)
        return Prompt(text, plain, o.chat, "" if o.chat else self.template.answer_prefix, shots, tokens,
                      notes, prefix=text[:split], ids=counted[1] if counted and counted[0] == text else None)

    def _truncate(self, item: Item, shots: list[int], budget: int, tokens: int) -> tuple[str, str, int, list[str]]:
        """Cut the item's longest field from the left until the prompt fits."""
        fields = [f for f in self.template.fields if isinstance(item.fields.get(f), str)]
        if not fields:
            raise ContextOverflowError(f"{item.source}: the prompt does not fit the {self.window}-token window "
                                       "and has no text field to shorten")
        name = max(fields, key=lambda f: len(str(item.fields[f])))  # text fields only (above)
        ids = self.tokenizer(str(item.fields[name]), add_special_tokens=False)["input_ids"]
        low, high, best = 0, len(ids), None
        while low <= high:  # the most tokens of the field's end that still fit
            keep = (low + high) // 2
            values = dict(item.fields, **{name: self.tokenizer.decode(ids[len(ids) - keep:]) if keep else ""})
            text, plain = self.compose(values, shots, item.source)
            count = self.count(text)
            if count <= budget:
                best, low = (text, plain, count, keep), keep + 1
            else:
                high = keep - 1
        if best is None:
            raise ContextOverflowError(f"{item.source}: even with '{name}' emptied the prompt exceeds the "
                                       f"{self.window}-token window; shorten the template or use fewer shots")
        text, plain, count, keep = best
        note = (f"{item.source}: prompt of {tokens} tokens did not fit the {self.window}-token window; "
                f"cut '{name}' from the left to its last {keep} of {len(ids)} tokens ({count} tokens now)")
        return text, plain, count, [note]


def check_shots(template: Template, shots: int, pool: Sequence[object] | None = None) -> None:
    """shots > 0 needs demonstrations (`pool`, else the template's examples, which must be its own) with
    answers; checked before any model time for every shot count a run will use."""
    if pool is None and template.examples_error:  # a file outside its folder: refused whatever the count
        raise TemplateError(template.examples_error)
    if shots <= 0:
        return
    if not (template.examples if pool is None else pool) and not (pool is None and not template.examples_read):
        raise TemplateError(
            f"template '{template.name}' has no examples, so --shots {shots} has nothing to show: "
            "add 'examples:' to the template or pass --examples FILE"
        )
    if not template.target:
        raise TemplateError(f"template '{template.name}' has no 'target' field, so it can't show answers in shots")


def make_builder(template: Template, tokenizer: Tokenizer, window: int | None, options: BuildOptions,
                 examples: str | None = None, input_path: str | None = None,
                 encoder_decoder: bool = False, lm: LM | None = None,
                 on_warn: Callable[[str], None] | None = None) -> PromptBuilder:
    """A builder whose pool is --examples FILE or the template's own examples; when that pool is the
    input file itself, each item is left out of its own demonstrations."""
    pool = None
    pool_path = template.examples_path
    if examples:
        pool = load_examples(examples)
        check_examples(template, pool, examples)
        pool_path = Path(examples).resolve()
    if input_path and input_path != "-" and pool_path is not None:
        options.pool_is_data = Path(input_path).resolve() == pool_path
    return PromptBuilder(template, tokenizer, window, options, pool, encoder_decoder, lm, on_warn)


def model_view(tokenizer: Tokenizer, text: str) -> str:
    """The prompt as the model sees it: its token ids decoded back to text. It differs from `text` where
    the tokenizer normalises: T5's turns every newline and run of spaces into one space, and a character
    outside its vocabulary (`{`, `<`, `~`...) into <unk>."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
