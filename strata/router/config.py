"""The picker's plugins from a YAML profile in the style of llm-d's and the Gateway API
Inference Extension's `EndpointPickerConfig`, so one file reads the same to both pickers:

    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
      - type: prefix-cache-affinity-filter
        parameters: {penaltySeconds: 0.5, waitRatio: 2}
      - type: queue-scorer
      - type: kv-cache-utilization-scorer
      - type: prefix-cache-scorer
      - type: token-load-scorer
    schedulingProfiles:
      - name: default
        plugins:
          - pluginRef: prefix-cache-affinity-filter
          - pluginRef: queue-scorer
            weight: 2
          - pluginRef: kv-cache-utilization-scorer
            weight: 2
          - pluginRef: prefix-cache-scorer
            weight: 3
          - pluginRef: token-load-scorer
            weight: 1

A scorer the profile leaves out has weight 0, and the affinity filter runs only if the
profile names it. Filters and pickers that Strata always runs (model, health, role; max
score) may be named and are accepted. Also: InferenceObjective priorities, for flow
control."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from strata.router.picker import DEFAULT_WEIGHTS, PrefixAffinityFilter

SCORERS = {"queue-scorer": "queue", "kv-cache-utilization-scorer": "kv-cache",
           "prefix-cache-scorer": "prefix", "precise-prefix-cache-scorer": "prefix",
           "token-load-scorer": "token-load"}
AFFINITY_FILTER = "prefix-cache-affinity-filter"
BUILT_IN = {"max-score-picker", "random-picker", "single-profile-handler", "decode-filter",
            "prefill-filter", "by-label", "model-filter", "health-filter"}


@dataclass
class PickerProfile:
    """The default: the three GIE scorers, no affinity filter. Measured (docs/benchmarks.md,
    Router): the filter at 0.5 s spread tenants evenly but cut the hit rate from 82% to
    54-61% and all-at-once throughput by a fifth; recomputing prefixes cost more than the
    imbalance it removed. With waitRatio 2 as well, the hit rate fell less (62-77%) but
    TTFT and throughput still lost to the profile without it."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    affinity: PrefixAffinityFilter | None = None


def load_profile(path: Path) -> PickerProfile:
    document = yaml.safe_load(path.read_text()) or {}
    if document.get("kind", "EndpointPickerConfig") != "EndpointPickerConfig":
        raise ValueError(f"{path}: kind must be EndpointPickerConfig")
    plugins = {}
    for plugin in document.get("plugins", []):
        kind = plugin["type"]
        if kind not in SCORERS and kind not in BUILT_IN and kind != AFFINITY_FILTER:
            raise ValueError(f"{path}: unknown plugin type {kind!r}; scorers: "
                             f"{sorted(SCORERS)}, filter: {AFFINITY_FILTER}")
        plugins[plugin.get("name", kind)] = plugin
    profiles = document.get("schedulingProfiles", [])
    chosen = next((p for p in profiles if p.get("name") == "default"),
                  profiles[0] if profiles else {"plugins": []})
    profile = PickerProfile(weights={})
    for ref in chosen.get("plugins", []):
        plugin = plugins.get(ref["pluginRef"])
        if plugin is None:
            raise ValueError(f"{path}: pluginRef {ref['pluginRef']!r} names no plugin")
        if plugin["type"] in SCORERS:
            profile.weights[SCORERS[plugin["type"]]] = float(ref.get("weight", 1))
        elif plugin["type"] == AFFINITY_FILTER:
            parameters = plugin.get("parameters") or {}
            profile.affinity = PrefixAffinityFilter(
                float(parameters.get("penaltySeconds", PrefixAffinityFilter.penalty_seconds)),
                float(parameters.get("waitRatio", PrefixAffinityFilter.wait_ratio)))
    return profile


def load_objectives(path: Path) -> dict[str, int]:
    """Each InferenceObjective's priority by name, from YAML documents in the shape of the
    Gateway API Inference Extension's resource (`---`-separated, or a `kind: List`):

        apiVersion: inference.networking.x-k8s.io/v1alpha2
        kind: InferenceObjective
        metadata: {name: batch}
        spec: {priority: -1, poolRef: {name: strata}}

    A request names its objective in x-gateway-inference-objective; an unknown or absent
    one has priority 0, as in GIE."""
    priorities = {}
    for document in yaml.safe_load_all(path.read_text()):
        items = (document or {}).get("items", [document]) if isinstance(document, dict) else []
        for item in items:
            if not item or item.get("kind") != "InferenceObjective":
                raise ValueError(f"{path}: every document must be an InferenceObjective")
            name = (item.get("metadata") or {}).get("name")
            priority = (item.get("spec") or {}).get("priority", 0)
            if not isinstance(name, str) or not isinstance(priority, int):
                raise ValueError(f"{path}: an InferenceObjective needs metadata.name and an "
                                 f"integer spec.priority")
            priorities[name] = priority
    return priorities
