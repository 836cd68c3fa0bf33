import contextlib
import json
import os
import re
from pathlib import Path

from typer.testing import CliRunner

from llmlab.commands.cli import app

# Where the tests run their models: LLMLAB_TEST_DEVICE=cpu (the default; what CI uses), cuda, cuda:N
# or mps. conftest.py checks the value once and, for cuda:N, shows the test process that one GPU as
# "cuda", so that CLI tests (which run with --device auto) land on the same card as direct loads.
TEST_DEVICE_CHOICES = "cpu (the default), cuda, cuda:N or mps"


def device_from_env() -> tuple[str, str | None]:
    """(the device tests load models onto, the problem with LLMLAB_TEST_DEVICE or None)."""
    raw = os.environ.get("LLMLAB_TEST_DEVICE", "").strip().lower() or "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", raw):
        return "cpu", f"LLMLAB_TEST_DEVICE={raw!r} is not a device the tests can use: choose {TEST_DEVICE_CHOICES}"
    return ("cuda" if raw.startswith("cuda") else raw), None


TEST_DEVICE = device_from_env()[0]


def on_device(lm, data, **kwargs):
    """torch.tensor(data) on the device the model runs on (hand computations next to llmlab's)."""
    import torch

    return torch.tensor(data, device=lm.device, **kwargs)


def invoke(args, input=None, env=None):
    """Run the CLI in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def save_tiny(model, tokenizer, folder: Path) -> Path:
    """Save a tiny test model and its tokenizer as a model folder: end of text is id 1 and padding
    id 0 in every tokenizer the tests build."""
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_pty(master: int, proc) -> bytes:
    """Everything a process writes to a pseudo-terminal, until it closes or the process ends."""
    import select

    captured = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            captured += chunk
        elif proc.poll() is not None:
            break
    return captured


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder or a file) read-only for this process while the block runs, root included.
    A normal user: its mode loses the write bits. Root writes through any mode, so for root the path
    is bind-mounted onto itself read-only (mount(2), as CI's container allows); the test skips, saying
    why, only where root may not mount."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    import ctypes

    import pytest

    libc = ctypes.CDLL(None, use_errno=True)
    where = str(path).encode()
    ms_rdonly, ms_remount, ms_bind = 1, 32, 4096
    if libc.mount(where, where, None, ms_bind, None) != 0:
        pytest.skip(f"running as root, and a read-only bind mount failed ({os.strerror(ctypes.get_errno())})")
    try:
        if libc.mount(b"none", where, None, ms_remount | ms_bind | ms_rdonly, None) != 0:
            pytest.skip(f"running as root, and remounting read-only failed ({os.strerror(ctypes.get_errno())})")
        assert not os.access(path, os.W_OK)
        yield path
    finally:
        libc.umount2(where, 2)  # MNT_DETACH
