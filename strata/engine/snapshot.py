"""The engine's books as the dashboard shows them (EngineSnapshot), and the log of the last
steps it keeps only while someone looks.

Built between two steps, in the engine's thread: copies of the pool's reference counts and
of the requests' block tables, and a walk of the prefix tree. The frontend asks for one at
most every few hundred milliseconds, and less often when the last one took long
(strata.dashboard.hub).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from typing import TYPE_CHECKING

from strata.engine.messages import (
    EngineSnapshot,
    EvictionView,
    RequestView,
    StepView,
    TreeNodeView,
)
from strata.engine.radix_cache import PREVIEW_TOKENS, RadixCache, RadixNode
from strata.engine.request import Request

if TYPE_CHECKING:
    from strata.engine.core import EngineCore
    from strata.engine.scheduler import SchedulerOutput

STEP_LOG = 64  # steps the dashboard's batch view shows
LOG_IDLE_SECONDS = 10.0  # the step log stops this long after the last snapshot
MAX_TREE_NODES = 32  # the largest subtrees, from the root down
MAX_WAITING_SHOWN = 64


class StepLog:
    """What the last steps batched: kept only while snapshots are asked for, so that an
    engine nobody watches pays nothing per step."""

    def __init__(self) -> None:
        self.steps: deque[StepView] = deque(maxlen=STEP_LOG)
        self.num_steps = 0
        self.active_until = 0.0

    def watch(self) -> None:
        self.active_until = time.monotonic() + LOG_IDLE_SECONDS

    def record(self, out: SchedulerOutput, preemptions: int) -> None:
        if time.monotonic() > self.active_until:
            return
        chunks = tokens = decodes = 0
        for request, num_new in zip(out.requests, out.num_new_tokens, strict=True):
            # Before the step's update: a decode extends an output already begun.
            if num_new == 1 and request.output_token_ids:
                decodes += 1
            else:
                chunks += 1
                tokens += num_new
        self.num_steps += 1
        self.steps.append(StepView(chunks, tokens, decodes, preemptions))


def take_snapshot(core: EngineCore) -> EngineSnapshot:
    started = time.perf_counter()
    scheduler, manager = core.scheduler, core.kv_cache_manager
    holders = [*scheduler.running, *scheduler.transferring.values(), *scheduler.held.values()]
    held_ids = set(scheduler.held)
    running = [_view(r, "held" if r.request_id in held_ids else r.status.value, True)
               for r in holders]
    waiting = [_view(r, r.status.value, False)
               for r in itertools.islice(scheduler.waiting, MAX_WAITING_SHOWN)]
    cache = manager.prefix_cache
    tree, num_nodes = _tree(cache) if cache is not None else ([], 0)
    evictions = _evictions(cache) if cache is not None else []
    tiers = {}
    if manager.offload is not None:
        tiers = {tier.medium: (len(tier.entries), tier.num_slots)
                 for tier in manager.offload.tiers}
    log = core.step_log
    log.watch()
    return EngineSnapshot(
        manager.block_size, _ref_counts(manager.pool.ref_counts), running, waiting,
        len(scheduler.waiting), list(log.steps), log.num_steps, scheduler.num_preemptions,
        tree, num_nodes, evictions, tiers, time.perf_counter() - started)


def _ref_counts(ref_counts: list[int]) -> bytes | list[int]:
    try:
        return bytes(ref_counts)
    except ValueError:  # over 255 holders
        return ref_counts[:]


def _view(request: Request, status: str, with_blocks: bool) -> RequestView:
    return RequestView(request.request_id, status, request.num_prompt_tokens,
                       len(request.output_token_ids), request.num_computed_tokens,
                       request.num_cached_tokens, list(request.block_ids) if with_blocks else [])


def _tree(cache: RadixCache) -> tuple[list[TreeNodeView], int]:
    """The largest subtrees (by blocks), from the root down: MAX_TREE_NODES nodes, each
    shown after its parent; and how many nodes the tree has."""
    order: list[RadixNode] = []  # every node, parents before children
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children.values())
    sizes: dict[int, int] = {}
    for node in reversed(order):
        sizes[id(node)] = node.num_blocks + sum(sizes[id(c)] for c in node.children.values())
    views: list[TreeNodeView] = []
    index: dict[int, int] = {}
    heap = [(-sizes[id(n)], i, n, -1) for i, n in enumerate(cache.root.children.values())]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while heap and len(views) < MAX_TREE_NODES:
        _, _, node, parent = heapq.heappop(heap)
        salted = cache.salt_of(node) is not None
        index[id(node)] = len(views)
        views.append(TreeNodeView(parent, node.num_blocks, sizes[id(node)], node.hits,
                                  node.lock_ref > 0,
                                  [] if salted else node.token_ids[:PREVIEW_TOKENS], salted))
        for child in node.children.values():
            heapq.heappush(heap, (-sizes[id(child)], tiebreak, child, index[id(node)]))
            tiebreak += 1
    return views, len(order)


def _evictions(cache: RadixCache) -> list[EvictionView]:
    now = time.monotonic()
    return [EvictionView(now - e.time, e.num_blocks, [] if e.salted else e.preview_token_ids,
                         e.salted) for e in reversed(cache.evictions)]
