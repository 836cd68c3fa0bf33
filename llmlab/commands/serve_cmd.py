"""`llmlab serve`: the model loaded once, behind an OpenAI-compatible HTTP API (llmlab.serving)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmlab.commands.app import hooks, model_config
from llmlab.commands.options import (AdapterOpt, Chat, Device, DeviceMapOpt, DtypeOpt, MaxMemoryOpt, Model, Quiet,
                                     Verbose)
from llmlab.core import console
from llmlab.core.config import Dtype, ServeConfig

SERVE_PANEL = "Server"


def _opt(*names: str, **kwargs):
    return typer.Option(*names, rich_help_panel=SERVE_PANEL, **kwargs)


def serve(
    model: Model = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto, chat: Chat = None,
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, adapter: AdapterOpt = None,
    host: Annotated[str, _opt("--host", help="Address to listen on. Anything but loopback needs --api-key.")]
    = "127.0.0.1",
    port: Annotated[int, _opt("--port", help="Port to listen on (0: any free port, printed on stderr).")] = 8000,
    api_key: Annotated[Optional[str], _opt("--api-key", envvar="LLMLAB_API_KEY", show_default="none",
                                           help="Every request must send 'Authorization: Bearer KEY'.")] = None,
    max_tokens: Annotated[int, _opt("--max-tokens", help="Most tokens one completion may ask for.")] = 1024,
    max_n: Annotated[int, _opt("--max-n", help="Most completions per prompt (n).")] = 8,
    max_body: Annotated[int, _opt("--max-body", help="Largest request body, in bytes (bigger: 413).")] = 2_000_000,
    max_prompt_tokens: Annotated[Optional[int], _opt("--max-prompt-tokens", show_default="the context window",
                                                     help="Longest prompt, in tokens.")] = None,
    batch_wait: Annotated[float, _opt("--batch-wait", help="Milliseconds a model call waits for other "
                                      "requests to batch with.")] = 5.0,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    r"""Serve a model over HTTP: OpenAI's /v1/completions (echo + logprobs scores prompts),
    /v1/chat/completions (streaming), /v1/models, /health, and llmlab's /v1/classify, /v1/render.

    Needs fastapi and uvicorn (pip install 'llmlab\[serve]'). Binds 127.0.0.1 unless told otherwise.
    """
    from llmlab.serving import server

    console.configure(quiet, verbose)
    cfg = ServeConfig(model_config(model, device, dtype, chat, device_map, max_memory, adapter=adapter), host, port,
                      api_key, max_body, max_prompt_tokens, max_tokens, max_n, batch_wait)
    server.serve(cfg, hooks(no_log=True))


def register(app: typer.Typer) -> None:
    """Add serve to the llmlab app."""
    app.command("serve")(serve)
