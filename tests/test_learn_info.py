"""llmlab info: parameter counts from the config alone equal the loaded model's sum(p.numel())."""

import json
from pathlib import Path

import pytest

from helpers import TEST_DEVICE, invoke, on_device

FLAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "flan-t5-config"
if not FLAN.is_dir():
    FLAN = Path("/work/shared/data/flan-t5-config")
needs_flan = pytest.mark.skipif(not FLAN.is_dir(), reason="shared/data/flan-t5-config is absent")


def _info(model):
    result = invoke(["info", model, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    from llmlab.backends import models

    return {k: models.load(str(tiny_models[k]), TEST_DEVICE, "float32") for k in ("t5", "llama", "gpt2")}


@pytest.mark.parametrize("kind, arch, tied", [
    ("t5", "encoder-decoder", True), ("llama", "decoder-only", True), ("gpt2", "decoder-only", True),
])
def test_parameter_count_equals_the_loaded_model(tiny_models, loaded, kind, arch, tied):
    info = _info(tiny_models[kind])
    model = loaded[kind].model
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["kind"] == arch and info["tied_embeddings"] is tied
    # embeddings + layer stacks + the rest account for every parameter exactly once
    assert info["embeddings"] + sum(s["total"] for s in info["stacks"]) + info["other"] == info["parameters"]
    emb = model.get_input_embeddings().weight.numel()
    assert info["embeddings"] >= emb
    layers = {"t5": 2 + 2, "llama": 2, "gpt2": 2}[kind]
    assert sum(s["layers"] for s in info["stacks"]) == layers
    assert info["memory_bytes"]["fp32"]["weights"] == 4 * info["parameters"]
    assert info["memory_bytes"]["int4"]["weights"] == info["parameters"] / 2
    assert info["training_bytes"] == 24 * info["parameters"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_kv_cache_per_token_equals_a_real_cache(tiny_models, loaded, kind):
    import torch

    lm = loaded[kind]
    ids = on_device(lm, [lm.tokenizer("the movie was great and")["input_ids"]])
    with torch.inference_mode():
        if lm.is_encoder_decoder:
            out = lm.model(input_ids=ids, decoder_input_ids=on_device(lm, [[0, 0, 0]]), use_cache=True)
        else:
            out = lm.model(input_ids=ids, use_cache=True)
    cache = getattr(out, "past_key_values", None) or out.cache
    self_cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder: the decoder's own tokens
    tokens = 3 if lm.is_encoder_decoder else ids.shape[1]
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in self_cache.layers) * 4  # fp32 bytes
    assert _info(tiny_models[kind])["memory_bytes"]["fp32"]["kv_per_token"] == stored / tokens


def test_untied_output_head_counts_once_more(tmp_path):
    """A checkpoint whose output head is its own matrix (FLAN-T5's), though transformers 5 builds T5 tied."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from conftest import build_tokenizer
    from llmlab.backends import models

    config = T5Config(vocab_size=400, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # untie
    folder = tmp_path / "untied"
    model.save_pretrained(folder)
    build_tokenizer("t5").save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(raw))
    real = sum(p.numel() for p in models.load(str(folder), "cpu", "float32").model.parameters())
    info = _info(folder)
    assert info["parameters"] == real == sum(p.numel() for p in model.parameters())
    assert real == sum(p.numel() for p in T5ForConditionalGeneration(config).parameters()) + 400 * 16
    assert info["tied_embeddings"] is False and "tie_word_embeddings: false" in info["notes"][0]


@needs_flan
def test_flan_t5_base_from_the_config_alone():
    info = _info(FLAN / "flan-t5-base.config.json")
    assert info["parameters"] == 247_577_856  # google/flan-t5-base's real count
    assert (info["kind"], info["hidden_size"], info["heads"], info["vocab_size"]) == ("encoder-decoder", 768, 12, 32128)
    assert [(s["name"], s["layers"]) for s in info["stacks"]] == [("encoder.block", 12), ("decoder.block", 12)]
    assert info["context_window"] == 512 and info["chat_template"] is None
    # KV cache per generated token: 2 x 12 decoder layers x 12 heads x 64 dims x 2 bytes (bf16)
    assert info["memory_bytes"]["bf16"]["kv_per_token"] == 2 * 12 * 12 * 64 * 2
    view = invoke(["info", FLAN / "flan-t5-base.config.json", "-f", "text"]).stdout
    assert "247,577,856 (247.6M)" in view
    assert "│ weights                                     │ 990.31 MB │ 495.16 MB │ 247.58 MB │ 123.79 MB │" in view
    assert "= 5.94 GB, about 6x the fp32 weights" in view
    small = _info(FLAN / "flan-t5-small.config.json")
    assert small["parameters"] == 76_961_152  # google/flan-t5-small's real count


@needs_flan
def test_a_folder_of_configs_names_them():
    result = invoke(["info", FLAN])
    assert result.exit_code == 4
    assert result.stderr.startswith(f"error: '{FLAN}' holds no config.json; pass one of its config files: ")
    assert "flan-t5-base.config.json" in result.stderr and result.stderr.count("\n") == 1


def test_missing_config_file():
    result = invoke(["info", "nowhere/config.json"])
    assert (result.exit_code, result.stderr) == (4, "error: config file 'nowhere/config.json' not found; check the path\n")
