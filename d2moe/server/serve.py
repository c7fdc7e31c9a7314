"""`d2moe serve`: open the model, start the engine thread, serve the API with uvicorn until stopped."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from d2moe.config import EngineConfig
from d2moe.engine.batcher import BatcherConfig
from d2moe.engine.chat_template import load_chat_template
from d2moe.engine.engine import Engine
from d2moe.engine.loop import EngineLoop
from d2moe.engine.model import open_model
from d2moe.errors import ServeError
from d2moe.server.app import ServerConfig, create_app
from d2moe.server.async_engine import AsyncEngine

log = logging.getLogger("d2moe")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model is opened: a taken port is a one-line error at once."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(path: Path, engine_cfg: EngineConfig, batcher: BatcherConfig, config: ServerConfig) -> int:
    import uvicorn

    sock = listen(config.host, config.port)
    template = load_chat_template(path)
    with open_model(path, engine_cfg) as model:
        model.require_tokenizer()
        log.info("%s; policy %s", model.plan.describe(), engine_cfg.policy)
        engine = Engine(model, batcher, engine_cfg.context)
        with EngineLoop(engine) as loop:
            app = create_app(AsyncEngine(loop, config.max_batch + config.max_queue), config, template)
            log.info("serving %r on http://%s:%d (max batch %d, queue %d, context %d tokens%s)",
                     config.model_name, config.host, config.port, config.max_batch, config.max_queue,
                     engine.context, ", API key required" if config.api_key else "")
            server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                                   access_log=False, timeout_graceful_shutdown=5))
            server.run(sockets=[sock])
    return 0
