"""EngineCore: add / abort / step over token ids. The server runs it in its own process."""

from __future__ import annotations

import logging

import torch

from strata.checkpoint import load_json, resolve_model_path
from strata.config import EngineConfig
from strata.engine.executor import Executor
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.kv_connector import make_connector
from strata.engine.kv_connector.connector import KVLayout
from strata.engine.kv_connector.group import RankGroupConnector, exchange_addresses
from strata.engine.kv_offload.copies import DEVICE
from strata.engine.kv_offload.manager import OffloadManager
from strata.engine.kv_transfer import KVTransfer
from strata.engine.messages import EngineCoreOutput, EngineSnapshot, EngineStats
from strata.engine.request import Request
from strata.engine.scheduler import Scheduler
from strata.engine.snapshot import StepLog, take_snapshot
from strata.engine.validation import validate_request
from strata.kv_events import KVEvent
from strata.model.safetensors_stream import WeightStream
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, weights: WeightStream | None = None) -> None:
        self.config = config
        # The stream's folder when the process started one: a URL's files are fetched once.
        self.model_path = weights.folder if weights else resolve_model_path(config.model)
        self.executor = Executor(config, self.model_path, weights)
        self.runner = self.executor.runner  # rank 0's
        self.max_model_len = self.runner.max_model_len
        try:
            self._init_rank0(config)
        except BaseException:
            self.executor.shutdown()
            raise

    def _init_rank0(self, config: EngineConfig) -> None:
        if config.kv_events_endpoint and not config.cache.enable_prefix_caching:
            logger.warning("KV events need the prefix cache: none will be published")
        if (not config.scheduler.enable_chunked_prefill
                and config.scheduler.max_num_batched_tokens < self.max_model_len):
            raise ValueError("without chunked prefill, max_num_batched_tokens must be at least "
                             f"max_model_len ({self.max_model_len})")
        self.eos_token_ids = _eos_token_ids(self.model_path)
        self.kv_events: list[KVEvent] = []  # taken by the publisher after each step
        on_event = self.kv_events.append if config.kv_events_endpoint else None
        runner = self.runner
        offload = None
        if runner.num_offload_blocks:  # every rank moves its own shard of each block
            offload = OffloadManager(runner.num_offload_blocks, runner.num_offload_disk_blocks,
                                     config.cache.block_size,
                                     runner.bytes_per_block * self.executor.tp.size, on_event)
        # The pool's events say "GPU" whatever the device, as vLLM's do: the medium names
        # the tier (the engine's own pool; "CPU" and "DISK" are the tiers under it).
        self.kv_cache_manager = KVCacheManager(
            runner.num_blocks, config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            hash_seed=config.cache.prefix_caching_hash_seed, on_event=on_event,
            medium=DEVICE, offload=offload)
        # Last: from here on the core holds a connector's sockets and threads (shutdown).
        self.kv_transfer = self._kv_transfer(config)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.kv_transfer)
        self.step_log = StepLog()  # the dashboard's; records only while it is watched

    def _kv_transfer(self, config: EngineConfig) -> KVTransfer | None:
        if config.kv_connector is None:
            return None
        connector = make_connector(config)
        try:
            tp = self.executor.tp
            connector.register(self.runner.kv_caches, KVLayout.of(
                self.runner.kv_caches, self.model_path, tp.rank, tp.size))
            if tp.size > 1:  # every rank moves its own shard; rank 0 drives them
                connector = RankGroupConnector(connector, tp, self.executor.timeout,
                                               exchange_addresses(tp, connector),
                                               self.executor.group_failed)
        except BaseException:
            connector.close()
            raise
        return KVTransfer(connector, config.cache.block_size, config.kv_lease_seconds)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.max_model_len, self.runner.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, cache_salt: str | None = None,
                    kv_transfer_params: dict | None = None) -> None:
        """Validate and queue; a bad request raises before anything is scheduled."""
        self.validate(prompt_token_ids, params)
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        if kv_transfer_params and self.kv_transfer is None:
            raise ValueError("kv_transfer_params need an engine with a KV connector "
                             "(--kv-connector)")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        request = Request(
            request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
            max_total_tokens=self.max_model_len, generator=generator, cache_salt=cache_salt)
        if kv_transfer_params:
            self.kv_transfer.parse(request, kv_transfer_params)
        self.scheduler.add_request(request)

    def warm_up(self) -> None:
        """Run one short request end to end, so that the first real one pays for no kernel
        build or allocator growth; it leaves no trace in the stats."""
        self.add_request("warm-up", [0, 0], SamplingParams(max_tokens=2, temperature=0.0,
                                                           ignore_eos=True))
        while self.has_unfinished_requests:
            self.step()
        self.scheduler.num_prompt_tokens_admitted = 0
        self.scheduler.num_cached_tokens_admitted = 0
        self.kv_cache_manager.reset_prefix_cache()
        self.kv_events.clear()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's reset_prefix_cache); False while one is in use."""
        return self.kv_cache_manager.reset_prefix_cache()

    def take_kv_events(self) -> list[KVEvent]:
        events = self.kv_events[:]
        self.kv_events.clear()
        return events

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, run the model once, and report each request's new token."""
        self.poll_transfers()
        preemptions = self.scheduler.num_preemptions
        scheduler_output = self.scheduler.schedule()
        copies = self.kv_cache_manager.take_copies()
        if copies:  # before anything writes a block: a peer's read, or the step
            self.executor.copy_blocks(copies)
        if scheduler_output.remote_reads:
            self.kv_transfer.start_reads(scheduler_output.remote_reads)
        if not scheduler_output.requests:
            return []
        self.step_log.record(scheduler_output, self.scheduler.num_preemptions - preemptions)
        model_output = self.executor.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, model_output)

    def poll_transfers(self) -> None:
        """Apply finished KV reads and end finished or expired leases (also while idle)."""
        if self.kv_transfer is None:
            return
        finished = self.kv_transfer.poll()
        for request_id in finished.reads:
            self.scheduler.finish_transfer(request_id, ok=True)
        for request_id, _ in finished.failed_reads:
            self.scheduler.finish_transfer(request_id, ok=False)
        for request_id in finished.leases:
            self.scheduler.release_held(request_id)

    def snapshot(self) -> EngineSnapshot:
        """The books as the dashboard shows them (strata.engine.snapshot)."""
        return take_snapshot(self)

    def check_health(self) -> None:
        """Raise if a tensor-parallel rank died or stopped answering (vLLM's check_health)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Release what the core holds outside its own memory: the KV connector's sockets,
        threads and NIXL registration, and the tensor-parallel ranks. Safe to call twice;
        the core takes no step after."""
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.executor.shutdown()

    @property
    def holds_leases(self) -> bool:
        """Some finished prefills' blocks wait for a decode instance to read them."""
        return self.kv_transfer is not None and bool(self.kv_transfer.leases)

    @property
    def waiting_on_transfers(self) -> bool:
        """Some requests wait for K/V from a peer (the loop naps if nothing else ran)."""
        return bool(self.scheduler.transferring)

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_waiting_tokens=scheduler.num_waiting_tokens,
            kv_cache_usage=self.kv_cache_manager.usage,
            num_cached_blocks=self.kv_cache_manager.num_cached_blocks,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=scheduler.num_prompt_tokens_admitted,
            prefix_cache_hits=scheduler.num_cached_tokens_admitted,
            **self._transfer_stats(), **self._offload_stats())

    def _offload_stats(self) -> dict:
        offload = self.kv_cache_manager.offload
        if offload is None:
            return {}
        hits, copied = offload.stats()
        return dict(kv_offload_hits=hits, kv_offload_bytes=copied,
                    kv_offload_seconds=dict(self.runner.copy_seconds))

    def _transfer_stats(self) -> dict:
        if self.kv_transfer is None:
            return {}
        stats = self.kv_transfer.stats
        durations, stats.new_durations = stats.new_durations, []
        return dict(kv_transfers=stats.num_reads, kv_transfer_bytes=stats.num_bytes,
                    kv_transfer_fallbacks=stats.num_fallbacks,
                    kv_transfer_durations=durations)


def _eos_token_ids(model_path) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (which may list several)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        value = load_json(model_path / name, required=False).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return frozenset(ids)
