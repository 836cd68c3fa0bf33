"""Start and stop the server: checks before any model time, the model loaded once (the same
loading path as every command), uvicorn on the address asked. SIGTERM or Ctrl-C: no new
connections, the requests in flight finish, then it exits."""

from __future__ import annotations

import ipaddress
import signal
import threading
from typing import TYPE_CHECKING, Callable, Optional

from llmlab.core.config import ServeConfig
from llmlab.core.errors import UsageError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from llmlab.backends.base import LM
    from llmlab.orchestration.session import Hooks

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(cfg: ServeConfig) -> None:
    """The options, before the model loads."""
    if not is_loopback(cfg.host) and not cfg.api_key:
        raise UsageError(f"--host {cfg.host} lets other machines in: give --api-key KEY (or LLMLAB_API_KEY), "
                         "or serve on 127.0.0.1")
    if not 0 <= cfg.port <= 65535:
        raise UsageError(f"invalid --port {cfg.port}: give 1-65535 (0 = any free port)")
    for option, number in (("--max-tokens", cfg.max_tokens), ("--max-n", cfg.max_n),
                           ("--max-body", cfg.max_body_bytes), ("--max-prompt-tokens", cfg.max_prompt_tokens or 1)):
        if number < 1:
            raise UsageError(f"invalid {option} {number}: must be >= 1")
    if cfg.batch_wait_ms < 0:
        raise UsageError(f"invalid --batch-wait {cfg.batch_wait_ms}: must be >= 0 milliseconds")
    if cfg.model.backend != "hf":
        raise UsageError("llmlab serve runs --backend hf models")


def uvicorn_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app` (its own logging off: llmlab logs its one line per problem)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None, lifespan="off")
    return uvicorn.Server(config)


def serve(cfg: ServeConfig, hooks: Hooks, lm: Optional[LM] = None,
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """`llmlab serve`: load the model, then answer until SIGTERM or Ctrl-C."""
    from llmlab.orchestration.session import Session
    from llmlab.serving.app import create_app

    check(cfg)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("llmlab serve needs fastapi and uvicorn: pip install 'llmlab[serve]'") from None
    session = Session(cfg.model, lm, hooks)
    app = create_app(session.lm, cfg)
    server = uvicorn_server(app, cfg.host, cfg.port)
    watcher = threading.Thread(target=_announce, args=(server, hooks, on_ready, session.lm.name), daemon=True)
    watcher.start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains, then re-raises the signal it caught: SIGTERM then ends here, exit status 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        app.state.batcher.close()


def _announce(server: uvicorn.Server, hooks: Hooks, on_ready: Optional[Callable[[str], None]], name: str) -> None:
    """Once listening: the address on stderr (the port chosen when --port 0)."""
    import time

    while not server.started:
        if getattr(server, "should_exit", False):
            return
        time.sleep(0.05)
    sock = server.servers[0].sockets[0].getsockname()
    url = f"http://{sock[0] if ':' not in sock[0] else '[' + sock[0] + ']'}:{sock[1]}"
    hooks.note(f"serving {name} at {url}/v1 (Ctrl-C or SIGTERM stops it)")
    if on_ready:
        on_ready(url)
