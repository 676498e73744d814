"""A container's command line and environment, resolved as the kubelet resolves them: env
entries from values, fields of the pod, ConfigMaps and Secrets, then `$(VAR)` expanded in
env, command and args."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

from strata.kube.objects import Manifests

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$ escapes a $). The kubelet leaves a reference to an
    undefined variable as it is, and it would reach strata as a literal: an error here."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(1) not in env:
            raise ValueError(f"$({match.group(1)}) is not in the container's environment")
        return env[match.group(1)]

    return _REFERENCE.sub(substitute, text)


def container_env(manifests: Manifests, container: dict, fields: dict[str, str],
                  secret: Callable[[str, str], str],
                  injected: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: what its controller injects (a LeaderWorkerSet's LWS_*
    variables), then its env entries in order. `fields` answers fieldRef paths
    (metadata.namespace, status.podIP, ...), `secret(name, key)` secretKeyRef."""
    env = dict(injected or {})
    for entry in container.get("env", []):
        name, source = entry["name"], entry.get("valueFrom")
        if source is None:
            env[name] = expand(entry.get("value", ""), env)
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path not in fields:
                raise ValueError(f"env {name}: fieldRef {path} is not supported here")
            env[name] = fields[path]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = manifests.config_map(ref["name"])
            if ref["key"] not in data:
                raise ValueError(f"env {name}: ConfigMap {ref['name']} has no key {ref['key']}")
            env[name] = data[ref["key"]]
        elif "secretKeyRef" in source:
            env[name] = secret(source["secretKeyRef"]["name"], source["secretKeyRef"]["key"])
        else:
            raise ValueError(f"env {name}: unsupported source {sorted(source)}")
    return env


def strata_argv(container: dict, env: dict[str, str]) -> list[str]:
    """The container's `strata` arguments (after the program), expanded."""
    argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
    if argv[:1] == ["strata"]:
        return argv[1:]
    if argv[:3] in (["python", "-m", "strata.cli"], ["python3", "-m", "strata.cli"]):
        return argv[3:]
    raise ValueError(f"container {container['name']}: not a strata command: {shlex.join(argv)}")
