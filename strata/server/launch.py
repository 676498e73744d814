"""`strata serve`: start the engine process, then the HTTP server in front of it.

The engine starts first (it imports torch and streams the weights), and this process
imports the tokenizer's libraries and opens its port meanwhile: until the engine is ready
the port answers with the phase of the start (strata.server.startup).

Uvicorn drains on SIGTERM and Ctrl-C: it stops accepting, lets in-flight requests
(streams included) finish, then the engine is told to shut down. If the engine
process dies, in-flight requests get 503, /health says 503, and the server exits
with a non-zero code shortly after, so a supervisor restarts it instead of it hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from pathlib import Path

import uvicorn
import uvloop
from prometheus_client import CollectorRegistry, generate_latest

from strata.checkpoint import resolve_model_path
from strata.config import EngineConfig
from strata.engine.client import AsyncEngineClient
from strata.server.kv_peers import KVPeers
from strata.server.limits import ServerLimits
from strata.server.startup import StartingApp, StartupState, SwitchableApp
from strata.uvicorn_server import DEFAULT_DRAIN_TIMEOUT, Server

logger = logging.getLogger("strata.server")
DEAD_ENGINE_GRACE_SECONDS = 2.0  # long enough for in-flight clients and probes to see the 503


def serve(config: EngineConfig, *, host: str, port: int, served_model_names: list[str],
          api_key: str | None, limits: ServerLimits,
          kv_peers: KVPeers, chat_template: str | None = None,
          access_log: bool = True, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
          dashboard: bool = True) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_path = resolve_model_path(config.model)
    return uvloop.run(_serve(config, str(model_path), chat_template, host=host, port=port,
                             served_model_names=served_model_names, api_key=api_key,
                             limits=limits, kv_peers=kv_peers, access_log=access_log,
                             drain_timeout=drain_timeout, dashboard=dashboard))


def _load_tokenizer(config: EngineConfig, model_path: Path, chat_template: str | None,
                    startup: StartupState):
    """The tokenizer and its chat template. Run in a thread while the engine starts: its
    libraries take seconds to import, which the engine need not wait for."""
    from strata.server.serving import FALLBACK_CHAT_TEMPLATE
    from strata.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model_path(config.tokenizer) if config.tokenizer else model_path)
    template = _read_template(chat_template) or tokenizer.hf.chat_template
    if template is None:
        logger.warning("the tokenizer has no chat template: chat requests use a plain one that "
                       "joins the messages' contents (pass --chat-template to set one)")
    tokenizer.hf.chat_template = template or FALLBACK_CHAT_TEMPLATE
    startup.frontend_ready()
    return tokenizer


async def _serve(config: EngineConfig, model_path: str, chat_template: str | None, *,
                 host: str, port: int, served_model_names: list[str], api_key: str | None,
                 limits: ServerLimits, kv_peers: KVPeers,
                 access_log: bool, drain_timeout: float, dashboard: bool) -> int:
    registry = CollectorRegistry()
    startup = StartupState(registry, served_model_names[0])
    client = AsyncEngineClient(config, Path(model_path))
    startup.engine_spawned = time.monotonic()
    starting = asyncio.create_task(client.start(startup.update))
    app = SwitchableApp(StartingApp(startup, lambda: generate_latest(registry)))
    server = Server(uvicorn.Config(app, host=host, port=port, access_log=access_log,
                                   timeout_keep_alive=30, log_level="info", lifespan="off",
                                   timeout_graceful_shutdown=drain_timeout))
    serving_task = asyncio.create_task(server.serve())
    loading = asyncio.create_task(asyncio.to_thread(_load_tokenizer, config, Path(model_path),
                                                     chat_template, startup))
    both = asyncio.gather(starting, loading)
    await asyncio.wait([serving_task, both], return_when=asyncio.FIRST_COMPLETED)
    if not both.done():  # stopped (a signal) or could not bind while the engine started
        both.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # retrieved, so nothing is logged
            await both
        await client.shutdown()
        await serving_task
        return 0 if server.started else 1
    try:
        info, tokenizer = both.result()
    except BaseException:
        server.should_exit = True
        await serving_task
        await client.shutdown()
        raise
    # Loaded by now, mostly (the tokenizer's thread imported the serving code).
    from strata.server.app import build_app
    from strata.server.metrics import ServerMetrics
    from strata.server.remote_prefill import RemotePrefill
    from strata.server.serving import OpenAIServing

    startup.ready(info.startup_seconds)
    gc.freeze()  # the tokenizer and the app live forever: keep them out of later collections
    logger.info("engine ready: %d KV blocks of %d tokens, max_model_len %d (pid %d); started in "
                "%.2f s (%s)", info.num_blocks, info.block_size, info.max_model_len, client.pid,
                startup.seconds["total"],
                ", ".join(f"{k} {v:.2f} s" for k, v in startup.seconds.items() if k != "total"))
    metrics = ServerMetrics(served_model_names[0], info.block_size, info.num_blocks, registry)
    client.on_stats = metrics.update_engine
    if config.kv_connector is not None and not kv_peers.configured:
        logger.warning("P/D fields are refused (400) until --kv-peers lists this server's peers")
    elif config.kv_connector is not None and kv_peers.token is None:
        logger.warning("no --kv-peer-token: any caller that reaches this server may send P/D "
                       "fields naming the --kv-peers")
    remote_prefill = RemotePrefill(kv_peers, config.kv_connector is not None,
                                   config.kv_transfer_timeout, api_key,
                                   metrics.kv_transfer_fallbacks.inc)
    serving = OpenAIServing(client, tokenizer, served_model_names, model_path, metrics, limits,
                            remote_prefill)
    hub = None
    if dashboard:
        from strata.dashboard.hub import DashboardHub
        from strata.server.dashboard import EngineDashboard

        hub = DashboardHub(EngineDashboard(serving).source)
        hub.stopping = lambda: server.should_exit  # open pages must not hold up a drain
    app.app = build_app(serving, api_key=api_key,
                        max_body_bytes=limits.body_bytes(info.max_model_len), dashboard=hub)
    exit_code = 0

    def engine_died() -> None:
        nonlocal exit_code
        exit_code = 1
        logger.error("the engine process died; shutting down in %.0f s", DEAD_ENGINE_GRACE_SECONDS)
        asyncio.get_running_loop().call_later(DEAD_ENGINE_GRACE_SECONDS,
                                              setattr, server, "should_exit", True)

    client.on_dead = engine_died
    try:
        await serving_task
    finally:
        await remote_prefill.http.aclose()
        await client.shutdown()
    return exit_code


def _read_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the template itself, as vLLM's does."""
    if value is None:
        return None
    return Path(value).read_text() if os.path.isfile(value) else value
