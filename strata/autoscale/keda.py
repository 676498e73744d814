"""Strata's load policy as KEDA triggers: the Prometheus queries and thresholds that make
KEDA's HPA compute what LoadPolicy.recommend computes. AverageValue: replicas =
ceil(query / threshold), and HPA takes the largest over the triggers, as the policy takes
the largest need. The look-ahead is PromQL's predict_linear over the trend window (a
least-squares line where the policy uses two halves), kept only when above the current
value, as the policy never extrapolates down. deploy/kubernetes/'s ScaledObjects carry
these; a test holds them equal."""

from __future__ import annotations

from strata.autoscale.policy import LoadPolicy

STEP = 15  # seconds between the subquery's samples: HPA's sync period


def triggers(policy: LoadPolicy, role: str, namespace: str, server_address: str) -> list[dict]:
    """The triggers for one role's pool: prefill sizes on the prompt tokens coming in,
    decode on the requests in flight, and both on the tokens waiting at their replicas."""
    selector = f'{{namespace="{namespace}",role="{role}"}}'

    def trigger(name: str, query: str, threshold: float) -> dict:
        return {"type": "prometheus", "name": f"{role}-{name}", "metricType": "AverageValue",
                "metadata": {"serverAddress": server_address, "query": query,
                             "threshold": f"{threshold:g}"}}

    rate = policy.prefill_tokens_per_second
    backlog = trigger("tokens-waiting", f"sum(strata:router_tokens_waiting{selector})\n"
                      f"/ {rate:g}", policy.target_seconds)
    if role == "prefill":
        window = f"{policy.trend_window:g}s"
        prompts = f"sum(rate(strata:router_prompt_tokens_total{selector}[{window}]))"
        return [trigger("prompt-tokens", f"{_ahead(prompts, policy)}\n/ {rate:g}",
                        policy.target_utilization), backlog]
    in_flight = f"sum(strata:router_inflight_requests{selector})"
    return [trigger("in-flight", f"{_ahead(in_flight, policy)}\n/ {policy.batch_slots}",
                    policy.target_utilization), backlog]


def _ahead(series: str, policy: LoadPolicy) -> str:
    """The series, or its value `lookahead` seconds ahead on its trend if that is higher."""
    trend = (f"predict_linear(({series})[{policy.trend_window:g}s:{STEP}s], "
             f"{policy.lookahead:g})")
    return f"(({trend} >= {series}) or {series})"
