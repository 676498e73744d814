"""`strata serve`'s dashboard data: the engine's snapshot (strata.engine.snapshot) as JSON,
its tokens turned into text, with sparklines from the same counters as /metrics."""

from __future__ import annotations

import asyncio
import time

from strata.dashboard.series import Line, Sparklines, registry_reader
from strata.engine.messages import EngineSnapshot, RequestView
from strata.server.serving import OpenAIServing

STATE_NAMES = ("free", "cached", "held", "shared")  # strata.engine.snapshot's byte values
LINES = [Line("ttft_seconds", "ttft_sum", "ttft_count"),
         Line("itl_seconds", "itl_sum", "itl_count"),
         Line("tokens_per_second", "generation_tokens"),
         Line("prefix_hit_rate", "prefix_hits", "prefix_queries")]
COUNTERS = {  # sampled counter -> its /metrics sample name
    "ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
    "itl_sum": "vllm:inter_token_latency_seconds_sum",
    "itl_count": "vllm:inter_token_latency_seconds_count",
    "generation_tokens": "vllm:generation_tokens_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "prefix_queries": "vllm:prefix_cache_queries_total",
}


class EngineDashboard:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.sparklines = Sparklines(LINES, registry_reader(serving.metrics.registry, COUNTERS))

    async def source(self) -> tuple[dict, float]:
        serving = self.serving
        serving.check_engine()
        snapshot = await serving.client.snapshot()
        previews = [n.preview_token_ids for n in snapshot.tree] + \
                   [e.preview_token_ids for e in snapshot.evictions]
        texts = await asyncio.to_thread(lambda: [serving.tokenizer.decode(p) for p in previews])
        return self.payload(snapshot, texts), snapshot.build_seconds

    def payload(self, snapshot: EngineSnapshot, texts: list[str]) -> dict:
        info, states = self.serving.info, snapshot.block_states
        tree_texts, eviction_texts = texts[:len(snapshot.tree)], texts[len(snapshot.tree):]
        return {
            "kind": "engine",
            "model": self.serving.served_names[0],
            "time": time.time(),
            "kv": {
                "block_size": snapshot.block_size,
                "num_blocks": len(states),
                "states": states.translate(bytes.maketrans(bytes(range(4)), b"0123")).decode(),
                "counts": {name: states.count(value) for value, name in enumerate(STATE_NAMES)},
                "tiers": {medium: {"blocks": used, "capacity": capacity}
                          for medium, (used, capacity) in snapshot.tiers.items()},
            },
            "batch": {
                "running": [_request(r) for r in snapshot.running],
                "waiting": [_request(r) for r in snapshot.waiting],
                "num_running": sum(r.status == "running" for r in snapshot.running),
                "num_waiting": snapshot.num_waiting,
                "max_num_seqs": info.max_num_seqs,
                "steps": [{"prefill_chunks": s.prefill_chunks, "prefill_tokens": s.prefill_tokens,
                           "decodes": s.decodes, "preemptions": s.preemptions}
                          for s in snapshot.steps],
                "num_steps": snapshot.num_steps,
                "num_preemptions": snapshot.num_preemptions,
            },
            "tree": {
                "num_nodes": snapshot.tree_num_nodes,
                "nodes": [{"parent": n.parent, "blocks": n.num_blocks,
                           "subtree_blocks": n.subtree_blocks, "hits": n.hits,
                           "locked": n.locked, "salted": n.salted, "text": text}
                          for n, text in zip(snapshot.tree, tree_texts)],
                "evicted": [{"age_seconds": round(e.age_seconds, 3), "blocks": e.num_blocks,
                             "salted": e.salted, "text": text}
                            for e, text in zip(snapshot.evictions, eviction_texts)],
            },
            "series": self.sparklines.update(),
            "cost": {"engine_seconds": snapshot.build_seconds},
        }


def _request(request: RequestView) -> dict:
    return {"id": request.request_id, "status": request.status,
            "prompt_tokens": request.num_prompt_tokens,
            "output_tokens": request.num_output_tokens,
            "computed_tokens": request.num_computed_tokens,
            "cached_tokens": request.num_cached_tokens, "blocks": request.block_ids}
