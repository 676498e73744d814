"""`strata serve`'s dashboard data: the engine's snapshot (strata.engine.snapshot) as JSON,
its tokens turned into text, with sparklines from the same counters as /metrics."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time

import numpy as np

from strata.dashboard.series import Line, Sparklines, registry_reader
from strata.engine.messages import EngineSnapshot, RequestView
from strata.server.serving import OpenAIServing

STATE_NAMES = ("free", "cached", "held", "shared")  # a block's state, by its digit
FREE, CACHED, HELD, SHARED = range(4)
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
        # The tree's nodes and the evictions change little from one snapshot to the next.
        self.text = functools.lru_cache(maxsize=1024)(
            lambda token_ids: serving.tokenizer.decode(list(token_ids)))

    async def source(self) -> tuple[dict, float]:
        serving = self.serving
        serving.check_engine()
        snapshot = await serving.client.snapshot()
        # Work that grows with the pool and the previews: off the event loop.
        payload = await asyncio.to_thread(self.payload, snapshot)
        cost = payload["cost"]  # both processes' time: on a small machine they share cores
        return payload, cost["engine_seconds"] + cost["frontend_seconds"]

    def payload(self, snapshot: EngineSnapshot) -> dict:
        started = time.perf_counter()
        info = self.serving.info
        states = block_states(snapshot.ref_counts, [r.block_ids for r in snapshot.running])
        texts = [self.text(tuple(preview)) for preview in itertools.chain(
            (n.preview_token_ids for n in snapshot.tree),
            (e.preview_token_ids for e in snapshot.evictions))]
        tree_texts, eviction_texts = texts[:len(snapshot.tree)], texts[len(snapshot.tree):]
        return {
            "kind": "engine",
            "model": self.serving.served_names[0],
            "time": time.time(),
            "kv": {
                "block_size": snapshot.block_size,
                "num_blocks": len(states),
                "states": states,
                "counts": {name: states.count(str(value))
                           for value, name in enumerate(STATE_NAMES)},
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
            "cost": {"engine_seconds": snapshot.build_seconds,
                     "frontend_seconds": time.perf_counter() - started},
        }


def block_states(ref_counts: bytes | list[int], held: list[list[int]]) -> str:
    """One digit per block: FREE, CACHED (in the prefix tree only), HELD (by requests only)
    or SHARED (both). The tree holds one reference on each block in it, each request one on
    each of its blocks: a block referenced more than its requests hold it is in the tree."""
    refs = (np.frombuffer(ref_counts, dtype=np.uint8) if isinstance(ref_counts, bytes)
            else np.asarray(ref_counts, dtype=np.int64))
    holders = np.bincount(np.fromiter(itertools.chain.from_iterable(held), dtype=np.int64),
                          minlength=len(refs))
    states = np.select([refs == 0, holders == 0, refs == holders], [FREE, CACHED, HELD], SHARED)
    return (states + ord("0")).astype(np.uint8).tobytes().decode("ascii")


def _request(request: RequestView) -> dict:
    return {"id": request.request_id, "status": request.status,
            "prompt_tokens": request.num_prompt_tokens,
            "output_tokens": request.num_output_tokens,
            "computed_tokens": request.num_computed_tokens,
            "cached_tokens": request.num_cached_tokens, "blocks": request.block_ids}
