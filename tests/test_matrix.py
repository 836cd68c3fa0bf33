"""Every shipped template x every command x every architecture, zero- and few-shot.

Architectures: a tiny T5 whose tokenizer behaves like T5's (no newline token: "\\n" is normalised to a
space), the tiny decoder-only llama with and without a chat template, and, when ../shared/data exists,
a tiny random T5 with the real T5 tokenizer (32,128-entry vocabulary). Templates come from
`prompts.list_templates()`, so a new shipped template joins the matrix by itself.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from helpers import invoke, jsonl, save_tiny
from llmlab.backends import models
from llmlab.prompting import prompts

# ../shared/data next to the repository (LLMLAB_SHARED_DATA overrides it, e.g. in a worktree).
SHARED = Path(os.environ.get("LLMLAB_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
T5_TOKENIZER = SHARED / "t5-tokenizer"
FLAN_CONFIG = SHARED / "flan-t5-config" / "flan-t5-small.config.json"
HAVE_REAL_T5 = (T5_TOKENIZER / "tokenizer.json").is_file() and FLAN_CONFIG.is_file()

TEMPLATES = prompts.list_templates()
NAMES = [t.name for t in TEMPLATES]
BY_NAME = {t.name: t for t in TEMPLATES}
CLASSIFY_NAMES = [t.name for t in TEMPLATES if t.task == "classify"]
GENERATE_NAMES = [t.name for t in TEMPLATES if t.task != "classify"]
ARCHS = [
    "t5-like",
    "llama",
    "llama-chat",
    pytest.param("t5-real", marks=pytest.mark.skipif(not HAVE_REAL_T5, reason=f"needs {T5_TOKENIZER} and {FLAN_CONFIG}")),
]
T5_ARCHS = {"t5-like", "t5-real"}
SHOTS = [0, 2]
# generate: (shots, --stop) pairs; None keeps the template's own stop texts. Zero- and few-shot, with
# and without --stop, without the full cross product (CPU time).
GENERATE_RUNS = [(0, None), (0, "\n"), (2, None)]
NEW_TOKENS = 3


# ---------------------------------------------------------------- models


def build_t5_like(folder: Path) -> Path:
    """The conftest T5, with a tokenizer that has no newline token and turns "\\n" into a space, as
    T5's SentencePiece normaliser does."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from conftest import CORPUS

    newline = pre_tokenizers.ByteLevel.alphabet()
    alphabet = [c for c in newline if c != "\u010a"]  # byte-level "Ċ" is "\n": leave it out of the vocabulary
    tok = Tokenizer(tok_models.BPE(unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    assert "\u010a" not in tokenizer.get_vocab()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _save(T5ForConditionalGeneration(config), tokenizer, folder)


def build_t5_real(folder: Path) -> Path:
    """FLAN-T5-small's configuration shrunk to a few thousand weights per layer, with the real T5 tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config.from_dict({**json.loads(FLAN_CONFIG.read_text()), "d_model": 32, "d_kv": 8, "d_ff": 64,
                                 "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4})
    torch.manual_seed(0)
    return _save(T5ForConditionalGeneration(config), AutoTokenizer.from_pretrained(T5_TOKENIZER), folder)


def _save(model, tokenizer, folder: Path) -> Path:
    model.generation_config.decoder_start_token_id = 0
    return save_tiny(model, tokenizer, folder)


@pytest.fixture(scope="session")
def archs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    found = {"t5-like": build_t5_like(root / "t5-like"), "llama": tiny_models["llama"],
             "llama-chat": tiny_models["llama-chat"]}
    if HAVE_REAL_T5:
        found["t5-real"] = build_t5_real(root / "t5-real")
    return found


_LOADED: dict[tuple, object] = {}


@pytest.fixture(autouse=True)
def _load_once(monkeypatch):
    """Each model goes through llmlab's real loading path once per session, not once per command."""
    real_load, real_tokenizer = models.load, models.load_tokenizer

    def load(spec=None, device="auto", dtype="auto", **placement):
        key = ("lm", spec, device, dtype, tuple(sorted((k, str(v)) for k, v in placement.items())))
        if key not in _LOADED:
            _LOADED[key] = real_load(spec, device, dtype, **placement)
        return _LOADED[key]

    def load_tokenizer(spec=None):
        key = ("tokenizer", spec)
        if key not in _LOADED:
            _LOADED[key] = real_tokenizer(spec)
        return _LOADED[key]

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(models, "load_tokenizer", load_tokenizer)


# ---------------------------------------------------------------- data


def value(field: str, n: int) -> str:
    if field == "dialogue":  # DialogSum's shape: one turn per line
        return f"#Person1#: Hello, are we still meeting at {n + 3}?\n#Person2#: Yes, see you at the station."
    return f"A short {field} number {n} about trains and weather."


def rows(template, count: int = 2) -> list[dict]:
    """Items with every field of the template, its target and its reference fields."""
    out = []
    for n in range(count):
        row = {"id": f"r{n}", **{f: value(f, n) for f in template.fields}}
        if template.target:
            labels = list(template.labels)
            row[template.target] = labels[n % len(labels)] if labels else f"The reference answer {n}."
        for ref in template.references:
            row[ref] = f"Reference {ref} for item {n}."
        out.append(row)
    return out


def write(tmp_path, template, count: int = 2) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(template, count)))
    return path


def stops_of(template, stop: str | None) -> list[str]:
    """The stop texts a generate run uses: --stop, else the template's generation.stop."""
    if stop is not None:
        return [stop]
    found = template.generation.get("stop") or []
    return [found] if isinstance(found, str) else list(found)



# ---------------------------------------------------------------- render


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_render(archs, tmp_path, name, arch, shots):
    """render prints the prompt as the model sees it: the same token ids generate feeds the model,
    after the tokenizer's normalisation (no newline reaches a T5), noted once on stderr when it differs."""
    template = BY_NAME[name]
    data = write(tmp_path, template)
    args = ["prompt", "render", name, "-m", archs[arch], "-i", data, "--shots", shots]
    text = invoke(args)
    assert text.exit_code == 0, text.stderr
    raw = jsonl(invoke(args + ["-f", "jsonl"]).stdout)
    tokenizer, _, _ = models.load_tokenizer(str(archs[arch]))
    shown = text.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(shown) == len(raw) == 2
    for seen, row in zip(shown, raw):
        assert tokenizer(seen)["input_ids"] == tokenizer(row["prompt"])["input_ids"]
        assert row.get("model_text", row["prompt"]) == seen
        for f in template.fields:
            assert " ".join(row[f].split()) in " ".join(seen.split())
    normalised = [row for row in raw if "model_text" in row]
    if arch in T5_ARCHS:
        assert normalised and all("\n" not in row["model_text"] for row in normalised)
        assert text.stderr.count("shown as the model sees it") == 1
    else:
        assert not normalised and "shown as the model sees it" not in text.stderr
    for row, line in zip(raw, [ln for ln in text.stderr.splitlines() if " tokens" in ln and "shots)" in ln]):
        used = int(line.rsplit("(", 1)[1].split()[0])
        assert used == shots or (used < shots and "dropped" in text.stderr)


# ---------------------------------------------------------------- generate


def _generate_cases():
    for name in NAMES:
        for arch in ARCHS:
            arch_id = arch if isinstance(arch, str) else arch.values[0]
            marks = [] if isinstance(arch, str) else list(arch.marks)
            for shots, stop in GENERATE_RUNS:
                yield pytest.param(name, arch_id, shots, stop, marks=marks,
                                   id=f"{name}-{arch_id}-{shots}shot-stop{stop!r}")


@pytest.mark.parametrize("name, arch, shots, stop", list(_generate_cases()))
def test_generate(archs, tmp_path, name, arch, shots, stop):
    """A batch through every template: one record per item, the prompt render shows, completions cut
    before any stop text, at most --max-new-tokens."""
    template = BY_NAME[name]
    data = write(tmp_path, template)
    args = ["generate", "-t", name, "-m", archs[arch], "-i", data, "--shots", shots,
            "--max-new-tokens", NEW_TOKENS] + (["--stop", stop] if stop else [])
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    out = jsonl(result.stdout)
    rendered = jsonl(invoke(["prompt", "render", name, "-m", archs[arch], "-i", data, "--shots", shots,
                             "-f", "jsonl", "--max-new-tokens", NEW_TOKENS]).stdout)
    assert [r["id"] for r in out] == ["r0", "r1"]
    assert [r["prompt_tokens"] for r in out] == [r["tokens"] for r in rendered]
    if arch != "llama-chat":  # with a chat template, records keep the plain prompt; render shows the chat text
        assert [r["prompt"] for r in out] == [r["prompt"] for r in rendered]
    for r in out:
        assert 0 <= r["completion_tokens"] <= NEW_TOKENS
        assert not any(s in r["completion"] for s in stops_of(template, stop))


# ---------------------------------------------------------------- classify


def other_model(template) -> list[str]:
    """A template whose probe ships fitted (for smollm2) refuses other models and other shots; on the
    tiny models it runs with contextual calibration instead."""
    fitted = template.probe_path is not None and template.probe_path.suffix == ".npz"
    return ["--calibration", "contextual"] if fitted else []


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CLASSIFY_NAMES)
def test_classify(archs, tmp_path, name, arch, shots):
    """Classify templates: one label per item with probabilities over every label."""
    template = BY_NAME[name]
    data = write(tmp_path, template)
    result = invoke(["classify", "-t", name, "-m", archs[arch], "-i", data, "--shots", shots, "-f", "jsonl",
                     *other_model(template)])
    assert result.exit_code == 0, result.stderr
    out = jsonl(result.stdout)
    assert [r["id"] for r in out] == ["r0", "r1"]
    for r in out:
        assert r["prediction"] in template.labels
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", GENERATE_NAMES)
def test_classify_refuses_a_generate_template(no_model, tmp_path, name):
    """Each generate template: classify names it in one usage line before any model time (the model and
    --shots play no part in it, so one case per template, not per architecture and shot count)."""
    data = write(tmp_path, BY_NAME[name])
    result = invoke(["classify", "-t", name, "-m", "./never-loaded", "-i", data, "--shots", 2, "-f", "jsonl"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: template '{name}' is a generate template; classify needs task: classify with labels\n"


# ---------------------------------------------------------------- eval


def _eval_cases():
    for name in NAMES:
        for arch in ARCHS:
            arch_id = arch if isinstance(arch, str) else arch.values[0]
            marks = [] if isinstance(arch, str) else list(arch.marks)
            yield pytest.param(name, arch_id, marks=marks, id=f"{name}-{arch_id}")


@pytest.mark.parametrize("name, arch", list(_eval_cases()))
def test_eval(archs, tmp_path, name, arch):
    """eval compares zero- and few-shot in one table: accuracy for classify, ROUGE for generate."""
    template = BY_NAME[name]
    data = write(tmp_path, template, count=3)
    result = invoke(["eval", "-t", name, "-m", archs[arch], "--data", data, "--shots", "0,2",
                     "--max-new-tokens", NEW_TOKENS, "--report", tmp_path / "report.json", *other_model(template)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    metric = "accuracy" if template.task == "classify" else "rouge"
    assert metric in lines[1].lower()  # lines[0] is the title: model on data (n items)
    body = [ln for ln in lines[2:] if ln.split()[:2] == [name, "data.jsonl"]]  # not the paired table's rows
    assert len(body) == 2, result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"] == [{"template": name, "path": str(data), "name": "data.jsonl", "items": 3}]
    assert report["model"]["encoder_decoder"] == (arch in T5_ARCHS)
    results = report["results"]
    assert [(r["template"], r["data_name"], r["task"], r["shots"], [run["items"] for run in r["runs"]])
            for r in results] == [(name, "data.jsonl", template.task, shots, [3]) for shots in (0, 2)]
    key, column = ("accuracy", "accuracy %") if template.task == "classify" else ("rouge1", "ROUGE-1")
    headers = re.split(r" {2,}", lines[1].strip())  # table cells are at least two spaces apart
    for row, r in zip(body, results):
        cells = dict(zip(headers, re.split(r" {2,}", row.strip())))
        mean = r["summary"][key]["mean"]
        assert cells["shots"].split()[0] == str(r["shots"]) and cells["n"] == "3"
        assert cells[column] == f"{100 * mean:.1f}" and 0 <= mean <= 1  # the table shows the report's number
        if template.task == "classify":  # 3 items, one seed: a whole number of right answers
            confusion = r["runs"][0]["metrics"]["confusion"]
            matrix, columns = confusion["matrix"], confusion["predicted"]
            right = sum(row[columns.index(gold)] for gold, row in zip(confusion["labels"], matrix) if gold in columns)
            assert sum(map(sum, matrix)) == 3 and mean == pytest.approx(right / 3)


# ---------------------------------------------------------------- FLAN-T5 token ids


@pytest.mark.skipif(not HAVE_REAL_T5, reason=f"needs {T5_TOKENIZER}")
@pytest.mark.parametrize("name", NAMES)
def test_t5_sees_every_template_whole(name):
    """With the real T5 tokenizer, a few-shot prompt of the template's own demonstrations has no <unk>,
    no empty word pieces from doubled spaces, and the input's opening words still mark where each
    demonstration starts once the newlines are gone (so the model can tell the shots apart)."""
    from transformers import AutoTokenizer

    from llmlab.io.records import Item

    tokenizer = AutoTokenizer.from_pretrained(T5_TOKENIZER)
    template = BY_NAME[name]
    shots = min(len(template.examples), 3)
    builder = prompts.make_builder(template, tokenizer, 512, prompts.options_for(template, shots=shots),
                                   encoder_decoder=True)
    values = {f: value(f, 0) for f in template.fields}
    prompt = builder.build(Item(0, values, "test"))
    ids = tokenizer(prompt.text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    space = tokenizer.convert_tokens_to_ids("\u2581")
    assert not any(a == b == space for a, b in zip(ids, ids[1:]))
    opening = template.input.split("{", 1)[0].strip()
    assert opening, f"template '{name}' input starts with a field: nothing marks where an item starts"
    marker = tokenizer(opening, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i : i + len(marker)] == marker]
    assert len(starts) == len(prompt.shots) + 1 == shots + 1
    assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.skipif(not HAVE_REAL_T5, reason=f"needs {T5_TOKENIZER}")
def test_flan_form_of_the_dialogue_template():
    """dialogue-summary-flan is FLAN's own "Dialogue: ... What was going on?"; T5 reads it without newlines."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(T5_TOKENIZER)
    template = BY_NAME["dialogue-summary-flan"]
    builder = prompts.make_builder(template, tokenizer, 512, prompts.options_for(template), encoder_decoder=True)
    from llmlab.io.records import Item

    text = builder.build(Item(0, {"dialogue": "#Person1#: Hi.\n#Person2#: Hello."}, "test")).text
    assert prompts.model_view(tokenizer, text) == "Dialogue: #Person1#: Hi. #Person2#: Hello. What was going on?"
