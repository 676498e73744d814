"""The KV transport for P/D: `connector.py` (the interface), `tcp.py` and `nixl.py` (two
implementations), `group.py` (one connector per tensor-parallel rank, driven by rank 0)."""

from __future__ import annotations

import uuid

from strata.config import EngineConfig
from strata.engine.kv_connector.connector import KVConnector


def make_connector(config: EngineConfig, rank: int = 0) -> KVConnector:
    """This rank's connector. With a fixed --kv-connector-port, rank r listens on it + r
    (vLLM's convention); else on any free port."""
    if config.kv_connector == "nixl":  # an optional install: imported only when asked for
        from strata.engine.kv_connector.nixl import NixlKVConnector as Connector
    elif config.kv_connector == "tcp":
        from strata.engine.kv_connector.tcp import TcpKVConnector as Connector
    else:
        raise ValueError(f"unknown KV connector {config.kv_connector!r} (nixl or tcp)")
    port = config.kv_connector_port + rank if config.kv_connector_port else 0
    return Connector(f"strata-{uuid.uuid4().hex[:12]}", config.kv_connector_host, port,
                     config.kv_transfer_timeout)
