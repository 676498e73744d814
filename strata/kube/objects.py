"""A rendered set of Kubernetes objects (`kubectl kustomize` output): lookups by kind and
name, ConfigMap and Secret data, the pod templates of workloads, label selection."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import NamedTuple

import yaml


class PodTemplate(NamedTuple):
    """A pod template of a workload: a Deployment's, or a LeaderWorkerSet's leader or
    worker template (`which`)."""

    owner: dict
    which: str  # template | leader | worker
    template: dict

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def spec(self) -> dict:
        return self.template["spec"]


@dataclass
class Manifests:
    objects: list[dict]

    @classmethod
    def parse(cls, text: str) -> Manifests:
        objects = [doc for doc in yaml.safe_load_all(text) if doc]
        for o in objects:
            if not isinstance(o, dict) or "kind" not in o or "name" not in o.get("metadata", {}):
                raise ValueError(f"not a Kubernetes object: {str(o)[:80]}")
        return cls(objects)

    def find(self, kind: str, name: str | None = None) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind
                and (name is None or o["metadata"]["name"] == name)]

    def one(self, kind: str, name: str) -> dict:
        found = self.find(kind, name)
        if len(found) != 1:
            raise ValueError(f"{kind} {name}: {len(found)} in the manifests, not one")
        return found[0]

    def config_map(self, name: str) -> dict[str, str]:
        return self.one("ConfigMap", name).get("data") or {}

    def secret(self, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None if the manifests do not have it."""
        if not self.find("Secret", name):
            return None
        secret = self.one("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return data | (secret.get("stringData") or {})

    def pod_templates(self) -> list[PodTemplate]:
        """Every workload's pod template (Deployments and LeaderWorkerSets)."""
        templates = []
        for o in self.objects:
            if o["kind"] == "Deployment":
                templates.append(PodTemplate(o, "template", o["spec"]["template"]))
            elif o["kind"] == "LeaderWorkerSet":
                lwt = o["spec"]["leaderWorkerTemplate"]
                templates += [PodTemplate(o, "leader",
                                          lwt.get("leaderTemplate", lwt["workerTemplate"])),
                              PodTemplate(o, "worker", lwt["workerTemplate"])]
        return templates


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def container_port(container: dict, name_or_number: str | int) -> int | None:
    """The port number a probe or Service names (by port name or number), if the container
    declares it."""
    for port in container.get("ports", []):
        if name_or_number in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    return None
