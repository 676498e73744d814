"""The token-backlog policy as a KEDA trigger: the Prometheus query and threshold that make
KEDA's HPA compute what BacklogPolicy.recommend computes (AverageValue: replicas =
ceil(query / threshold), query = backlog seconds of one replica's work, threshold = the
target seconds). deploy/kubernetes/'s decode ScaledObject carries it; a test holds the two
equal."""

from __future__ import annotations

from strata.autoscale.policy import BacklogPolicy


def backlog_trigger(policy: BacklogPolicy, role: str, namespace: str, server_address: str,
                    default_rate: float = 1000.0) -> dict:
    """The trigger for one role's pool. The rate is the picker's measured one (the mean over
    that role's endpoints), or default_rate until it has measured one."""
    selector = f'{{namespace="{namespace}",role="{role}"}}'
    query = (f"sum(strata:router_inflight_tokens{selector})\n"
             f"/ (avg(strata:router_token_rate{selector} > 0)\n"
             f"   or vector({default_rate:g}))")
    return {"type": "prometheus", "name": f"{role}-token-backlog",
            "metricType": "AverageValue",
            "metadata": {"serverAddress": server_address, "query": query,
                         "threshold": f"{policy.target_seconds:g}"}}
