"""One step's batch under a token budget: decodes, prompt chunks, preemption.

There are no separate prefill and decode phases: every request has tokens
whose K/V are computed (`num_computed_tokens`) and tokens still to compute, and
each step gives some of the budget to each. Running requests go first (a
decode costs one token), then waiting prompts fill what is left, chunked to
fit. When the pool runs out of blocks, the newest running request is
preempted: its blocks are freed and it is recomputed later. Admission keeps
back blocks for the running requests' expected growth, so that preemption (and
the recompute it costs) stays rare.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.config import SchedulerConfig
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.messages import EngineCoreOutput
from strata.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from strata.engine.kv_transfer import KVTransfer
    from strata.engine.runner import ModelRunnerOutput


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Admitted with blocks for their prompt, which a peer's KV is to be read into.
    remote_reads: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 kv_transfer: KVTransfer | None = None) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.kv_transfer = kv_transfer  # hands finished prefills' blocks to decode instances
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.transferring: dict[str, Request] = {}  # reading their prompt's K/V from a peer
        self.held: dict[str, Request] = {}  # finished prefills whose blocks a peer may read
        self.num_preemptions = 0
        # Tokens the waiting requests will compute (at most: some may be cached), kept as
        # they come and go: each waits with no token computed and its count fixed.
        self.num_waiting_tokens = 0
        self.num_prompt_tokens_admitted = 0
        self.num_cached_tokens_admitted = 0  # of those, found in the prefix cache
        self._lpm_ordered = False  # the waiting queue is in LPM order, not arrival order
        self.new_token_ratio = config.init_new_token_ratio
        self._ratio_decay = (config.init_new_token_ratio - config.min_new_token_ratio) / max(
            1, config.new_token_ratio_decay_steps)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_waiting_tokens += request.num_tokens

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        aborted = [self.requests[i] for i in request_ids if i in self.requests]
        for request in aborted:
            if request.status == RequestStatus.TRANSFERRING:
                # A peer may be writing into its blocks: they are freed when the read ends.
                request.status = RequestStatus.FINISHED_ABORTED
                del self.requests[request.request_id]
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
                self.num_waiting_tokens -= request.num_tokens
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return aborted

    def finish(self, request: Request, status: RequestStatus) -> dict | None:
        """Mark finished and return its blocks at once; the caller drops it from `running`.
        A prefill that hands its blocks to a decode instance keeps them, held for a lease:
        returns the kv_transfer_params that say where to read them."""
        request.status = status
        del self.requests[request.request_id]
        if request.kv_transfer_out and status != RequestStatus.FINISHED_ABORTED:
            self.held[request.request_id] = request
            return self.kv_transfer.handoff(request)
        self.kv_cache_manager.free(request)
        return None

    def release_held(self, request_id: str) -> None:
        """A held prefill's lease ended: its blocks were read, or nobody came in time."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.kv_cache_manager.free(request)

    def finish_transfer(self, request_id: str, ok: bool) -> None:
        """A read of a request's prompt K/V ended: it decodes from there, or, if the read
        failed, computes its prompt itself in the blocks it already holds."""
        request = self.transferring.pop(request_id)
        if request.status.finished:  # aborted during the read
            self.kv_cache_manager.free(request)
            return
        if ok:
            request.num_computed_tokens = request.num_tokens - 1
            self.kv_cache_manager.cache_blocks(request)
        request.remote_prefill = None
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_new):
                break  # the request preempted itself: nothing newer is left to schedule
            out.add(request, num_new)
            budget -= num_new
            index += 1

        # After a preemption the pool is short: admitting now would only thrash.
        if self.num_preemptions == preemptions_before:
            budget = self._admit(out, budget)
        self.new_token_ratio = max(self.config.min_new_token_ratio,
                                   self.new_token_ratio - self._ratio_decay)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Move waiting requests into the batch while budget, sequences and blocks last."""
        kv_cache_manager, config = self.kv_cache_manager, self.config
        if not self.waiting or budget <= 0 or len(self.running) >= config.max_num_seqs:
            return budget
        if kv_cache_manager.prefix_cache is not None:
            self._order_waiting()
        in_flight = self._blocks_in_flight()
        reserved = sum(self._blocks_to_come(r) for r in self.running)
        admitted: list[Request] = []
        # Candidates a deferral may skip past are bounded: a long queue is not rescanned.
        for request in itertools.islice(self.waiting.copy(), config.lpm_max_waiting):
            if budget <= 0 or len(self.running) + len(self.transferring) >= config.max_num_seqs:
                break
            match = kv_cache_manager.get_computed_blocks(request)
            if self._computed_elsewhere(request, match.num_hit_blocks, in_flight):
                continue  # another request is computing its next block: reuse it next step
            num_new = request.num_tokens - match.num_hit_blocks * kv_cache_manager.block_size
            if request.remote_prefill is not None:
                # Blocks for all of the prompt but its last token, read rather than computed.
                if not kv_cache_manager.allocate_slots(request, num_new - 1, match):
                    break
                self._mark_scheduled(request)
                request.status = RequestStatus.TRANSFERRING
                self.transferring[request.request_id] = request
                out.remote_reads.append(request)
                continue
            if config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                break
            # Waiting requests never preempt running ones; the first always gets in.
            to_come = self._blocks_to_come(request) - match.num_blocks
            free = kv_cache_manager.num_free_blocks - match.num_evictable_blocks
            if self.running and to_come + reserved > free:
                break
            if not kv_cache_manager.allocate_slots(request, num_new, match):
                break
            reserved += self._blocks_to_come(request)
            self._mark_scheduled(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            out.add(request, num_new)
            budget -= num_new
            in_flight.update(self._uncomputed_blocks(request))
        if admitted:
            newest = max(r.arrival_time for r in admitted)
            for request in self.waiting:
                if request.arrival_time < newest:
                    request.num_passed_over += 1
        return budget

    def _mark_scheduled(self, request: Request) -> None:
        self.waiting.remove(request)
        self.num_waiting_tokens -= request.num_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = request.num_computed_tokens
            self.num_prompt_tokens_admitted += request.num_prompt_tokens
            self.num_cached_tokens_admitted += request.num_cached_tokens

    def _order_waiting(self) -> None:
        """Longest cached prefix first (SGLang's LPM), so that what is cached is used before
        it is evicted. Preempted requests, and any passed over max_passed_over times, go
        first; a long queue stays FCFS, where matching every request would cost too much."""
        config = self.config
        if config.schedule_policy != "lpm" or len(self.waiting) < 2:
            return
        if len(self.waiting) > config.lpm_max_waiting:
            if self._lpm_ordered:  # back to arrival order (preempted requests first)
                self.waiting = deque(sorted(self.waiting, key=lambda r: (
                    r.status != RequestStatus.PREEMPTED, r.arrival_time)))
                self._lpm_ordered = False
            return
        prefix_cache = self.kv_cache_manager.prefix_cache
        size = self.kv_cache_manager.block_size

        def priority(request: Request) -> tuple:
            urgent = (request.status == RequestStatus.PREEMPTED
                      or request.num_passed_over >= config.max_passed_over)
            if urgent:
                return (0, 0, request.arrival_time)
            cached = prefix_cache.match_length(request.all_token_ids, request.cache_salt,
                                               (request.num_tokens - 1) // size)
            return (1, -cached, request.arrival_time)

        self.waiting = deque(sorted(self.waiting, key=priority))
        self._lpm_ordered = True

    def _uncomputed_blocks(self, request: Request) -> list[int]:
        """Hashes of the full blocks of its prompt the request has still to compute."""
        if self.kv_cache_manager.prefix_cache is None:
            return []
        size = self.kv_cache_manager.block_size
        end = request.num_tokens // size
        start = request.num_computed_tokens // size
        return self.kv_cache_manager.block_hashes(request, end)[start:end] if start < end else []

    def _blocks_in_flight(self) -> set[int]:
        """Prompt blocks that running requests are computing right now."""
        in_flight: set[int] = set()
        for request in self.running:
            if request.num_computed_tokens < request.num_tokens - 1:
                in_flight.update(self._uncomputed_blocks(request))
        return in_flight

    def _computed_elsewhere(self, request: Request, num_cached_blocks: int,
                            in_flight: set[int]) -> bool:
        """Whether the first block this request would compute is being computed by another
        (several requests with one uncached prefix: one computes it, the others reuse it)."""
        if not in_flight:
            return False
        manager = self.kv_cache_manager
        hashes = manager.block_hashes(request, (request.num_tokens - 1) // manager.block_size)
        return num_cached_blocks < len(hashes) and hashes[num_cached_blocks] in in_flight

    def _blocks_to_come(self, request: Request) -> float:
        """Blocks the request is expected to add: its uncomputed tokens, plus its remaining
        output scaled by new_token_ratio."""
        limit = request.max_total_tokens
        if request.sampling_params.max_tokens is not None:
            limit = min(limit, request.num_prompt_tokens + request.sampling_params.max_tokens)
        expected = request.num_tokens + self.new_token_ratio * max(0, limit - request.num_tokens)
        return max(0.0, expected / self.kv_cache_manager.block_size - len(request.block_ids))

    def _make_room(self, request: Request, num_new: int) -> bool:
        """Allocate for a running request, preempting the newest until it fits."""
        while not self.kv_cache_manager.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.new_token_ratio = self.config.init_new_token_ratio  # admitted too many: back off
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.num_waiting_tokens += request.num_tokens

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance each scheduled request by the tokens it computed. Those whose step reached
        the end of their tokens sampled one (the model's rows, in step order): each gets it,
        finishes if it should, and has its output."""
        token_ids, logprobs = model_output.sampled_token_ids, model_output.logprobs
        outputs: list[EngineCoreOutput] = []
        row = 0
        for request, num_new in zip(scheduler_output.requests,
                                    scheduler_output.num_new_tokens, strict=True):
            request.num_computed_tokens += num_new
            self.kv_cache_manager.cache_blocks(request)
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prompt chunk that is not the last: nothing sampled yet
            request.append_token(token_ids[row])
            status = request.check_stop()
            handoff = self.finish(request, status) if status is not None else None
            first = len(request.output_token_ids) == 1
            outputs.append(EngineCoreOutput(
                request.request_id, token_ids[row],
                logprobs[row] if logprobs is not None else None,
                finish_reason=status.value if status is not None else None,
                stop_reason=request.stop_reason
                if status == RequestStatus.FINISHED_STOPPED else None,
                queue_time=request.first_scheduled_time - request.arrival_time if first else None,
                num_cached_tokens=request.num_cached_tokens if first else None,
                kv_transfer_params=handoff))
            row += 1
        if row != len(token_ids):
            raise RuntimeError(f"the model sampled {len(token_ids)} rows for {row} requests")
        if any(o.finish_reason is not None for o in outputs):
            self.running = [r for r in self.running if not r.status.finished]
        return outputs
