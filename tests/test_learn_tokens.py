"""llmlab tokenize: token ids equal the tokenizer's, spans tile the text, template budgets add up."""

from pathlib import Path

import pytest

from helpers import invoke, jsonl

T5_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "t5-tokenizer"
if not T5_TOKENIZER.is_dir():
    T5_TOKENIZER = Path("/work/shared/data/t5-tokenizer")
needs_t5 = pytest.mark.skipif(not T5_TOKENIZER.is_dir(), reason="shared/data/t5-tokenizer is absent")
TEXT = "the movie was great!\n  Ganymede isn't 12345 ünï"


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["t5", "llama", "gpt2"])
def test_ids_and_spans_equal_the_tokenizers(tiny_models, kind):
    result = invoke(["tokenize", "-m", tiny_models[kind], TEXT])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    tok = _tokenizer(tiny_models[kind])
    assert [r["id"] for r in rows] == tok(TEXT)["input_ids"]
    assert [r["token"] for r in rows] == tok.convert_ids_to_tokens(tok(TEXT)["input_ids"])
    assert "".join(r["text"] for r in rows) == TEXT  # the spans tile the text: nothing lost, nothing twice
    assert all(TEXT[r["start"]:r["end"]] == r["text"] for r in rows)
    assert f"{len(rows)} tokens of the" in result.stderr


@needs_t5
def test_t5_and_smollm2_split_the_same_text_differently(smollm2_cache):
    text = "Studies have been shown that owning a dog is good for you"
    t5 = jsonl(invoke(["tokenize", "-m", T5_TOKENIZER, text]).stdout)
    # The ids the Hugging Face T5 docs give for this sentence; SentencePiece marks spaces with ▁, adds </s>.
    assert [r["id"] for r in t5] == [6536, 43, 118, 2008, 24, 293, 53, 3, 9, 1782, 19, 207, 21, 25, 1]
    assert [r["token"] for r in t5][5:9] == ["▁own", "ing", "▁", "a"]
    assert [r["text"] for r in t5][5:9] == [" own", "ing", " ", "a"]  # ▁ stands for the space before it
    assert "".join(r["text"] for r in t5) == text
    smol = jsonl(invoke(["tokenize", text]).stdout)  # the embedded SmolLM2: byte-level BPE, Ġ for a space
    assert [r["token"] for r in smol][:3] == ["Studies", "Ġhave", "Ġbeen"]
    assert "".join(r["text"] for r in smol) == text and len(smol) != len(t5)


@needs_t5
def test_terminal_view_exact():
    result = invoke(["tokenize", "-m", T5_TOKENIZER, "Hello world!", "-f", "text"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "Hello world!</s>\n\nHello|␣world|!|</s>\n\n8774 296 55 1 \n\n"
        f"4 tokens of the 512-token context window (0.8%) · tokenizer of {T5_TOKENIZER}\n"
    )


def test_template_budget_parts_add_up(tiny_models):
    result = invoke(["tokenize", "-m", tiny_models["llama"], "-t", "sentiment", "--shots", 2, "I loved it"])
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    parts = {}
    for r in rows:
        parts.setdefault(r["part"], []).append(r)
    assert list(parts) == ["instruction", "format", "demonstration 1", "demonstration 2", "input"]
    text = lambda name: "".join(r["text"] for r in parts[name])  # noqa: E731
    assert text("instruction") == "Classify the sentiment of each movie review as Positive or Negative."
    assert text("input").strip() == "Review: I loved it\nSentiment:"
    assert text("demonstration 1").strip().endswith("Sentiment: Positive")
    assert text("demonstration 2").strip().endswith("Sentiment: Negative")
    assert set(text("format")) <= {"\n"}  # the separators between the parts
    # the line on stderr: each part's count, the total against the window, room for new tokens
    total = len(rows)
    assert result.stderr.strip() == (
        f"instruction {len(parts['instruction'])} · demonstration 1 {len(parts['demonstration 1'])} · "
        f"demonstration 2 {len(parts['demonstration 2'])} · input {len(parts['input'])} · "
        f"format {len(parts['format'])} · total {total} of 2048, {2048 - total} left"
    )
    view = invoke(["tokenize", "-m", tiny_models["llama"], "-t", "sentiment", "--shots", 2, "I loved it", "-f", "text"])
    assert f"│ prompt total             │ {total}" in view.stdout
    assert f"│ room left for new tokens │ {2048 - total}   │ (max_new_tokens asks for 3) │" in view.stdout


def test_chat_wraps_the_text_in_the_template(tiny_models):
    rows = jsonl(invoke(["tokenize", "-m", tiny_models["llama-chat"], "hello", "--chat", "on"]).stdout)
    assert "".join(r["text"] for r in rows) == "<|user|>hello</s><|assistant|>"
    assert [r["special"] for r in rows][0] is True


@pytest.mark.parametrize("args, message, code", [
    (["tokenize"], "error: no text: run llmlab tokenize", 2),
    (["tokenize", "x", "--chat", "on"], "error: --chat on: this model's tokenizer has no chat template", 2),
    (["tokenize", "x", "-f", "csv"], "error: invalid --format 'csv': choose auto, jsonl or text", 2),
    (["tokenize", "-t", "no-such-template", "x"], "error: no template named 'no-such-template'", 3),
])
def test_mistakes_are_one_line(fake_lm, args, message, code):
    result = invoke(args + ["-m", "fake"])
    assert result.exit_code == code
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""
