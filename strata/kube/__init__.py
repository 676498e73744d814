"""Kubernetes manifests, read and run on one machine: `strata up -f` runs a rendered overlay
of deploy/kubernetes/ as local processes (a pod per loopback address), and the manifest
tests resolve container commands with the same code."""
