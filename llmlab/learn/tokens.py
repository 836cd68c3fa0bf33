"""Tokenization made visible: which tokens (and ids) a text becomes, where each token sits in the
text, and for a template prompt how many tokens each part costs (instruction, each demonstration,
the input, the formatting around them) against the model's context window. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypedDict

from llmlab.core.errors import TemplateError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from rich.console import Console

    from llmlab.io.items import Item
    from llmlab.prompting.prompts import Prompt, PromptBuilder
    from llmlab.prompting.templates import Template

from llmlab.core.config import plural

# Background colours cycled over neighbouring tokens so their boundaries show (like the OpenAI
# tokenizer page); a token keeps its colour in the text view and in the id view.
COLOURS = ("on #3b4f7a", "on #5a3b7a", "on #2f6b4f", "on #7a5a2f", "on #7a2f3b", "on #2f6b7a")
FORMAT = "format"  # the part name for separators, chat markup and special tokens


@dataclass
class Token:
    index: int  # position in the sequence, 0-based
    id: int  # the vocabulary id the model sees
    token: str  # the vocabulary entry (▁ / Ġ mark a leading space in SentencePiece / byte-level BPE)
    text: str  # the piece of the input text this token covers ("" for added special tokens)
    start: int  # character offsets of `text` in the input: text[start:end]
    end: int
    special: bool  # BOS, EOS, chat markers...: tokens that carry structure, not content
    part: str | None = None  # with a template: instruction, demonstration N, input or format


@dataclass
class Part:
    name: str
    start: int  # character span of the part in the prompt text
    end: int
    tokens: int = 0


@dataclass
class Budget:
    """How a built prompt spends the context window."""

    parts: list[Part]
    total: int
    window: int | None
    max_new_tokens: int  # what the template / settings ask to generate
    encoder_decoder: bool
    shots: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def room(self) -> int | None:
        """Tokens left in the window after the prompt. For a decoder-only model the new tokens
        share the window with the prompt; an encoder-decoder's window is the encoder's input only."""
        return None if self.window is None else self.window - self.total


def tokenize(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[Token]:
    """The tokens of `text` exactly as the model gets them, each mapped back to its characters."""
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials = set(tokenizer.all_special_ids)  # the named ones (BOS, EOS, pad...) and added special tokens:
    specials |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                 if getattr(t, "special", False)}
    # added: BOS/EOS the tokenizer puts in, with no text behind them (offsets (0, 0)).
    added = [i in specials and s == e for i, (s, e) in zip(ids, encoded["offset_mapping"])]
    spans = [list(o) for o in encoded["offset_mapping"]]
    real = [n for n in range(len(ids)) if not added[n]]
    for n, following in zip(real, real[1:]):
        # A lone SentencePiece "▁" reports the character after it, which the next token also
        # claims: end each token where the next one starts.
        spans[n][1] = max(spans[n][0], min(spans[n][1], spans[following][0]))
    cursor = 0
    for n in real:
        # "▁word" (T5, Llama) reports its offsets without the space it stands for: give each
        # token the gap before it, so the spans tile the text with no holes.
        spans[n][0] = min(cursor, spans[n][1])
        cursor = max(cursor, spans[n][1])
    tokens = []
    for n, (tid, piece) in enumerate(zip(ids, pieces)):
        start, end = spans[n]
        tokens.append(Token(n, tid, str(piece), "" if added[n] else text[start:end], start, end, tid in specials))
    return tokens


def part_spans(pieces: Sequence[tuple[str, str]], text: str) -> list[Part]:
    """Where each (part name, piece text) lies in the prompt `text`, found in order. A part named
    twice in a row (a demonstration's question and answer) spans from its first piece to its last."""
    parts: list[Part] = []
    cursor = 0
    for name, piece in pieces:
        if not piece:
            continue
        at = text.find(piece, cursor)
        if at < 0:  # a chat template that rewrites content: leave this piece unattributed
            continue
        if parts and parts[-1].name == name:
            parts[-1].end = at + len(piece)
        else:
            parts.append(Part(name, at, at + len(piece)))
        cursor = at + len(piece)
    return parts


def assign_parts(tokens: list[Token], parts: list[Part]) -> list[Part]:
    """Give every token the part its first character falls in (special tokens the tokenizer adds,
    separators and chat markup go to `format`); count each part's tokens. Parts in prompt order,
    then format; the counts add up to len(tokens)."""
    fmt = Part(FORMAT, 0, 0)
    for token in tokens:
        home = None
        if token.end > token.start:
            home = next((p for p in parts if p.start <= token.start < p.end), None)
            if home is None:  # a token that starts in a gap but reaches into a part (a merged "\n\nReview")
                home = next((p for p in parts if token.start < p.start < token.end), None)
        home = home or fmt
        home.tokens += 1
        token.part = home.name
    return parts + [fmt]


def template_pieces(template: Template, values: Mapping[str, object], pool: Sequence[Mapping[str, object]],
                    shots: Sequence[int]) -> list[tuple[str, str]]:
    """(part name, text) of a template prompt in the order they appear in it."""
    from llmlab.prompting.prompts import fill

    pieces = []
    if template.instruction:
        pieces.append(("instruction", fill(template.instruction, values, "instruction")))
    for n, i in enumerate(shots, 1):
        if template.target is None:
            raise TemplateError(f"template '{template.name}' has no 'target' field, so it can't show answers in shots")
        example = pool[i]
        pieces.append((f"demonstration {n}", fill(template.input, example, "example")))
        pieces.append((f"demonstration {n}", template.verbalize(example[template.target])))
    pieces.append(("input", fill(template.input, values, "input")))
    return pieces


def budget(builder: PromptBuilder, item: Item, max_new_tokens: int) -> tuple[Prompt, list[Token], Budget]:
    """Build the prompt for one item and account for every token of it by part."""
    built = builder.build(item)
    tokens = tokenize(builder.tokenizer, built.text, add_special_tokens=not built.chat)
    pieces = template_pieces(builder.template, item.fields, builder.pool, built.shots)
    parts = assign_parts(tokens, part_spans(pieces, built.text))
    return built, tokens, Budget(parts, len(tokens), builder.window, max_new_tokens, builder.encoder_decoder,
                                 len(built.shots), list(built.notes))


def visible(text: str) -> str:
    """A token's text with its whitespace made visible: ␣ for a space, \\n for a newline."""
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


class _TokenRecord(TypedDict):
    item: int
    index: int
    id: int
    token: str
    text: str
    start: int
    end: int
    special: bool


class TokenRecord(_TokenRecord, total=False):
    """A token in `llmlab tokenize -f jsonl`."""

    part: str


def record(token: Token, item: int) -> TokenRecord:
    out: TokenRecord = {"item": item, "index": token.index, "id": token.id, "token": token.token, "text": token.text,
           "start": token.start, "end": token.end, "special": token.special}
    if token.part is not None:
        out["part"] = token.part
    return out


def budget_line(b: Budget) -> str:
    """One line for stderr: every part's tokens, the total, the window and the room left."""
    parts = " · ".join(f"{p.name} {p.tokens}" for p in b.parts if p.tokens or p.name != FORMAT)
    return f"{parts} · total {b.total}" + (f" of {b.window}, {b.room} left" if b.window else "")


def render(tokens: list[Token], console: Console) -> None:
    """The text as coloured token spans, the pieces between bars, then the ids in the same colours."""
    from rich.text import Text

    spans, ids = Text(), Text()
    for t in tokens:
        style = COLOURS[t.index % len(COLOURS)]
        if t.special and not t.text:
            spans.append(t.token, style="bold dim")
        else:
            spans.append(t.text.replace("\n", "↵\n"), style=style)
        ids.append(str(t.id), style=style)
        ids.append(" ")
    console.print(spans)
    console.print()
    # the same split in plain characters (readable without colours): pieces between bars
    console.print("|".join(visible(t.text or t.token) for t in tokens), markup=False)
    console.print()
    console.print(ids)


def render_budget(b: Budget, console: Console) -> None:
    from rich.table import Table

    table = Table("part", "tokens", "share of the prompt", title=f"token budget ({plural(b.shots, 'shot')})")
    for p in b.parts:
        if p.tokens or p.name != FORMAT:
            table.add_row(p.name, str(p.tokens), f"{p.tokens / b.total:.0%}" if b.total else "-")
    table.add_row("[bold]prompt total[/bold]", f"[bold]{b.total}[/bold]", "100%")
    if b.window:
        table.add_row("context window", str(b.window), "")
        if b.encoder_decoder:
            table.add_row("room left in the encoder's window", str(b.room),
                          f"(the decoder writes up to {b.max_new_tokens} new tokens on its own)")
        else:
            table.add_row("room left for new tokens", str(b.room), f"(max_new_tokens asks for {b.max_new_tokens})")
    console.print(table)
