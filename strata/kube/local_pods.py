"""The pods a set of manifests runs, laid out on this machine: each pod on a loopback address
of its own (Linux routes all of 127.0.0.0/8 to the loopback interface), so that every
container listens on the ports its manifest names, as in its own network namespace; its
volumes as local folders; its command and environment resolved as the kubelet would."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from strata.kube.containers import container_env, strata_argv
from strata.kube.objects import Manifests, PodTemplate
from strata.kube.probes import Probe

ALL_INTERFACES = "0.0.0.0"  # in a pod: its own interfaces, that is its address here


@dataclass
class LocalContainer:
    name: str
    command: list[str]
    env: dict[str, str]
    probes: dict[str, Probe]  # by kind: startup, readiness, liveness
    serves_model: bool  # a `strata serve` (shares the cores with the others)


@dataclass
class LocalPod:
    name: str
    namespace: str
    labels: dict[str, str]
    ip: str
    containers: list[LocalContainer]
    ports: dict[str, int]  # the containers' named ports
    group: str | None = None  # a LeaderWorkerSet group, which lives and dies as one
    ready: bool = False
    running: bool = False

    def as_object(self, version: int) -> dict:
        """The pod as the API server shows it (what a pod watcher reads)."""
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": self.labels, "resourceVersion": str(version)},
                "status": {"phase": "Running" if self.running else "Pending",
                           "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                           "conditions": [{"type": "Ready",
                                           "status": str(self.ready and self.running)}]}}


@dataclass
class PodLayout:
    """Where the pods go: their addresses, their volumes' folders, the secrets they read."""

    manifests: Manifests
    network: ipaddress.IPv4Network
    workdir: Path  # ConfigMap files and emptyDirs go here
    claims: dict[str, Path]  # PersistentVolumeClaim name -> the folder that stands for it
    env: dict[str, str] = field(default_factory=dict)  # every container's, e.g. KUBECONFIG
    generated_secrets: dict[tuple[str, str], str] = field(default_factory=dict)
    _addresses: Iterator = field(init=False)

    def __post_init__(self) -> None:
        if not self.network.subnet_of(ipaddress.ip_network("127.0.0.0/8")):
            raise ValueError(f"pod network {self.network}: must be inside 127.0.0.0/8")
        self._addresses = self.network.hosts()

    def pods(self) -> list[LocalPod]:
        pods = []
        for template in self.manifests.pod_templates():
            owner = template.owner
            name = owner["metadata"]["name"]
            replicas = owner["spec"].get("replicas", 1)
            if owner["kind"] == "Deployment":
                pods += [self._pod(f"{name}-{i}", template) for i in range(replicas)]
            elif template.which == "leader":
                pods += self._groups(template, replicas)
        return pods

    def _groups(self, leader: PodTemplate, replicas: int) -> list[LocalPod]:
        """A LeaderWorkerSet's groups: a leader and size-1 workers each, with the variables
        LWS injects (the leader's address is its pod address here, a DNS name there)."""
        lws = leader.owner
        name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
        (worker,) = [t for t in self.manifests.pod_templates()
                     if t.owner is lws and t.which == "worker"]
        pods = []
        for g in range(replicas):
            leader_ip = self._address()
            for k in range(size):
                injected = {"LWS_LEADER_ADDRESS": leader_ip, "LWS_GROUP_SIZE": str(size),
                            "LWS_WORKER_INDEX": str(k)}
                pods.append(self._pod(f"{name}-{g}" + (f"-{k}" if k else ""),
                                      leader if k == 0 else worker, injected,
                                      leader_ip if k == 0 else None, group=f"{name}-{g}"))
        return pods

    def _address(self) -> str:
        try:
            return str(next(self._addresses))
        except StopIteration:
            raise ValueError(f"pod network {self.network}: too small for the pods") from None

    def _pod(self, name: str, template: PodTemplate, injected: dict[str, str] | None = None,
             ip: str | None = None, group: str | None = None) -> LocalPod:
        for part in ("initContainers", "ephemeralContainers"):
            if template.spec.get(part):
                raise ValueError(f"pod {name}: {part} are not supported here")
        ip = ip or self._address()
        namespace = template.owner["metadata"].get("namespace", "default")
        fields = {"metadata.name": name, "metadata.namespace": namespace, "status.podIP": ip,
                  "status.hostIP": "127.0.0.1", "spec.nodeName": socket.gethostname()}
        containers = []
        for spec in template.spec["containers"]:
            env = container_env(self.manifests, spec, fields, self._secret, injected)
            mounts = self._mounts(name, template.spec, spec)
            argv = [ip if arg == ALL_INTERFACES else _local_path(arg, mounts)
                    for arg in strata_argv(spec, env)]
            env = {k: _local_path(v, mounts) for k, v in env.items()}
            probes = {kind: Probe.from_spec(spec[f"{kind}Probe"], spec)
                      for kind in ("startup", "readiness", "liveness") if f"{kind}Probe" in spec}
            containers.append(LocalContainer(
                spec["name"], [sys.executable, "-m", "strata.cli", *argv],
                self.env | env, probes, argv[:1] == ["serve"]))
        ports = {p["name"]: p["containerPort"] for spec in template.spec["containers"]
                 for p in spec.get("ports", []) if "name" in p}
        return LocalPod(name, namespace, dict(template.labels), ip, containers, ports, group)

    def _secret(self, name: str, key: str) -> str:
        data = self.manifests.secret(name)
        if data is None:  # one the operator creates on a cluster (docs/kubernetes.md)
            return self.generated_secrets.setdefault((name, key), secrets.token_urlsafe(32))
        if key not in data:
            raise ValueError(f"Secret {name} has no key {key}")
        return data[key]

    def _mounts(self, pod: str, spec: dict, container: dict) -> list[tuple[str, str]]:
        """(mount path, local folder) of each volume the container mounts, longest first."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = []
        for mount in container.get("volumeMounts", []):
            if "subPath" in mount:
                raise ValueError(f"pod {pod}: volumeMounts subPath is not supported here")
            volume = volumes[mount["name"]]
            mounts.append((mount["mountPath"].rstrip("/"), str(self._folder(pod, volume))))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def _folder(self, pod: str, volume: dict) -> Path:
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in self.claims:
                raise ValueError(f"pod {pod} mounts the claim {claim}: say which folder "
                                 f"stands for it (--volume {claim}=DIR)")
            return self.claims[claim]
        if "configMap" in volume or "secret" in volume:
            source = "configMap" if "configMap" in volume else "secret"
            name = volume[source]["name" if source == "configMap" else "secretName"]
            data = (self.manifests.config_map(name) if source == "configMap"
                    else self.manifests.secret(name))
            if data is None:
                raise ValueError(f"pod {pod} mounts the Secret {name}, which is not in the "
                                 f"manifests")
            folder = self.workdir / source / name
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (folder / key).write_text(text)
            return folder
        if "emptyDir" in volume:
            folder = self.workdir / "emptyDir" / pod / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        raise ValueError(f"pod {pod}: volume {volume['name']} of a kind not supported here "
                         f"({sorted(k for k in volume if k != 'name')})")


def _local_path(text: str, mounts: list[tuple[str, str]]) -> str:
    """A path inside a mounted volume, as the local folder's path."""
    for mount_path, folder in mounts:
        if text == mount_path or text.startswith(mount_path + "/"):
            return folder + text[len(mount_path):]
    return text


def child_env(container: LocalContainer, threads: int) -> dict[str, str]:
    """The process' environment: this machine's (PATH, ...) without a cluster's API address,
    then the container's, torch's threads a share of the cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env |= container.env
    if container.serves_model:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env

