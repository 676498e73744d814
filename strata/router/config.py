"""Scorer weights from a YAML profile in the style of the Gateway API Inference Extension's
`EndpointPickerConfig`, so one file reads the same to both pickers:

    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
      - type: queue-scorer
      - type: kv-cache-utilization-scorer
      - type: prefix-cache-scorer
    schedulingProfiles:
      - name: default
        plugins:
          - pluginRef: queue-scorer
            weight: 2
          - pluginRef: kv-cache-utilization-scorer
            weight: 2
          - pluginRef: prefix-cache-scorer
            weight: 3

A scorer the profile leaves out has weight 0. Filters and pickers that Strata always runs
(model, health, role; max score) may be named and are accepted."""

from __future__ import annotations

from pathlib import Path

import yaml

SCORERS = {"queue-scorer": "queue", "kv-cache-utilization-scorer": "kv-cache",
           "prefix-cache-scorer": "prefix", "precise-prefix-cache-scorer": "prefix"}
BUILT_IN = {"max-score-picker", "random-picker", "single-profile-handler", "decode-filter",
            "prefill-filter", "by-label", "model-filter", "health-filter"}


def load_weights(path: Path) -> dict[str, float]:
    document = yaml.safe_load(path.read_text()) or {}
    if document.get("kind", "EndpointPickerConfig") != "EndpointPickerConfig":
        raise ValueError(f"{path}: kind must be EndpointPickerConfig")
    types = {}
    for plugin in document.get("plugins", []):
        kind = plugin["type"]
        if kind not in SCORERS and kind not in BUILT_IN:
            raise ValueError(f"{path}: unknown plugin type {kind!r}; scorers: "
                             f"{sorted(SCORERS)}")
        types[plugin.get("name", kind)] = kind
    profiles = document.get("schedulingProfiles", [])
    profile = next((p for p in profiles if p.get("name") == "default"),
                   profiles[0] if profiles else {"plugins": []})
    weights = {}
    for ref in profile.get("plugins", []):
        kind = types.get(ref["pluginRef"])
        if kind is None:
            raise ValueError(f"{path}: pluginRef {ref['pluginRef']!r} names no plugin")
        if kind in SCORERS:
            weights[SCORERS[kind]] = float(ref.get("weight", 1))
    return weights
