"""KV offloading: the tiers under the device pool, their books, their copies, their events;
then greedy tokens with blocks loaded back from the host and disk tiers."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import httpx
import pytest
import torch

from strata import LLM, SamplingParams
from strata.config import SchedulerConfig
from strata.engine.kv_cache_manager import KVCacheManager
from strata.engine.kv_offload.copies import DEVICE, DISK, HOST
from strata.engine.kv_offload.manager import OffloadManager
from strata.engine.kv_offload.stores import TierStores
from strata.engine.runner import ModelRunnerOutput
from strata.engine.scheduler import Scheduler
from strata.model.cpu_kernels import kv_blocks_kernel
from strata.router.kv_event_index import KVEventIndex
from tests.conftest import STORIES, assert_all_blocks_free
from tests.kv_invariants import check_kv_books, tree_nodes
from tests.server_process import ServerProcess
from tests.test_radix_cache import BS, make_request, random_samples, random_traffic
from tests.test_server_prefix_cache import complete, random_prompt


def check_tier_books(offload: OffloadManager) -> None:
    for tier in offload.tiers:
        slots = [entry.slot for entry in tier.entries.values()]
        assert len(set(slots)) == len(slots), f"{tier.medium}: a slot holds two blocks"
        assert not set(slots) & set(tier.free_slots), f"{tier.medium}: a free slot is used"
        assert len(slots) + len(tier.free_slots) == tier.num_slots, f"{tier.medium}: leak"
        assert not tier.busy, "slots stay busy after the step's copies were taken"


class Contents:
    """What each device block and tier slot holds, as the block hash whose K/V it is: the
    copies move labels, the step's forward writes the blocks it computes."""

    def __init__(self) -> None:
        self.slots: dict[tuple[str, int], object] = {}

    def copy(self, copies) -> None:
        for run in copies.runs:
            moved = [self.slots.get((run.source, s)) for s in run.source_slots]
            for slot, label in zip(run.target_slots, moved, strict=True):
                self.slots[run.target, slot] = label

    def forward(self, kv: KVCacheManager, out) -> None:
        for request, num_new in zip(out.requests, out.num_new_tokens, strict=True):
            end = request.num_computed_tokens + num_new
            hashes = kv.block_hashes(request, end // BS)
            for index in range(request.num_computed_tokens // BS, -(-end // BS)):
                full = (index + 1) * BS <= end
                self.slots[DEVICE, request.block_ids[index]] = \
                    hashes[index] if full else "partial"


@pytest.mark.parametrize("seed", range(3))
def test_random_scheduling_keeps_every_tiers_books_contents_and_event_index(seed):
    """The random scheduling run of the device pool's books, over a pool of 24 blocks with a
    host tier of 10 and a disk tier of 8 under it. After every step: the pool's and the
    tiers' books balance; every cached block and every tier slot holds the K/V of the block
    it is indexed as (copies applied in the step's order, then the step's writes); and a
    router index rebuilt from the events alone equals each tier's contents."""
    rng = random.Random(seed)
    events = []
    offload = OffloadManager(10, 8, BS, 1, on_event=events.append)
    kv = KVCacheManager(24, BS, enable_prefix_caching=True, on_event=events.append,
                        medium=DEVICE, offload=offload)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=20,
                                          max_passed_over=4, init_new_token_ratio=0,
                                          min_new_token_ratio=0), kv)
    prefixes = [[rng.randrange(50) for _ in range(24)] for _ in range(6)]
    index, contents = KVEventIndex(), Contents()
    next_id = 0
    for step in range(1500):
        next_id = random_traffic(rng, scheduler, prefixes, next_id)
        out = scheduler.schedule()
        contents.copy(kv.take_copies())
        contents.forward(kv, out)
        scheduler.update_from_output(out, random_samples(rng, out))
        check_kv_books(kv, list(scheduler.requests.values()))
        check_tier_books(offload)
        for node in tree_nodes(kv.prefix_cache.root):
            for block, block_hash in zip(node.block_ids, node.block_hashes, strict=True):
                assert contents.slots[DEVICE, block] == block_hash, f"step {step}: pool"
        for tier in offload.tiers:
            for block_hash, entry in tier.entries.items():
                assert contents.slots[tier.medium, entry.slot] == block_hash, tier.medium
        index.apply("e", step, events)
        events.clear()
        held = index.endpoints["e"].tiers
        assert held.get(DEVICE, set()) == {h for n in tree_nodes(kv.prefix_cache.root)
                                           for h in n.block_hashes}
        assert held.get(HOST, set()) == set(offload.tiers[0].entries)
        assert held.get(DISK, set()) == set(offload.tiers[1].entries)
    assert scheduler.num_preemptions > 0
    assert offload.hit_blocks[HOST] > 0 and offload.hit_blocks[DISK] > 0
    assert offload.copied_blocks[HOST, DISK] > 0 and offload.dropped_blocks > 0
    scheduler.abort_requests(list(scheduler.requests))
    check_kv_books(kv, [])


def test_events_carry_the_medium_and_a_lower_tier_scores_between_none_and_the_pool():
    events: list = []
    offload = OffloadManager(4, 0, BS, 1, on_event=events.append)
    kv = KVCacheManager(4, BS, enable_prefix_caching=True, on_event=events.append,
                        medium=DEVICE, offload=offload)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), kv)
    first, second = list(range(1, 10)), list(range(20, 33))
    for request_id, tokens in (("a", first), ("b", second)):
        scheduler.add_request(make_request(request_id, tokens, max_tokens=1))
        out = scheduler.schedule()
        kv.take_copies()
        scheduler.update_from_output(out, ModelRunnerOutput([0]))
    # a cached 2 blocks; b's 13 tokens need all 4: a's two went down to the host tier.
    a_hashes = kv.block_hashes(make_request("x", first), 2)
    b_hashes = kv.block_hashes(make_request("y", second), 3)
    assert [(type(e).__name__, e.medium, e.block_hashes) for e in events] == [
        ("BlockStored", DEVICE, a_hashes),
        ("BlockStored", HOST, a_hashes[:1]), ("BlockStored", HOST, a_hashes[1:]),
        ("BlockRemoved", DEVICE, a_hashes),
        ("BlockStored", DEVICE, b_hashes)]
    index = KVEventIndex()
    index.apply("e", 0, events)
    in_pool, in_host = index.match("e", b_hashes), index.match("e", a_hashes)
    assert in_pool == 1.0 and 0 < in_host < in_pool
    assert index.match("e", [12345, 678]) == 0.0


def _conversations(llm_kwargs: dict, turns: int = 2) -> tuple[list, list, object]:
    """Six conversations of ~100-token turns, taken in turn over a pool of 32 blocks (each
    turn pushes the others' blocks out): each turn's greedy tokens and cached tokens."""
    rng = random.Random(0)
    llm = LLM(str(STORIES), num_kv_blocks=32, max_num_seqs=2, **llm_kwargs)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    histories = [[1] + [rng.randrange(3, 500) for _ in range(100)] for _ in range(6)]
    tokens, cached = [], []
    for _ in range(turns):
        for i, history in enumerate(histories):
            output = llm.generate({"prompt_token_ids": history}, params, use_tqdm=False)[0]
            tokens.append(output.outputs[0].token_ids)
            cached.append(output.num_cached_tokens)
            histories[i] = history + tokens[-1] + [rng.randrange(3, 500) for _ in range(8)]
    assert_all_blocks_free(llm)
    stats = llm.engine.stats()
    llm.shutdown()
    return tokens, cached, stats


@pytest.fixture(scope="module")
def without_tiers():
    return _conversations({})


@pytest.mark.parametrize("tiers", [
    {"num_offload_blocks": 200},
    # A host tier of 10 blocks over a disk tier: most hits come back from disk.
    {"num_offload_blocks": 10, "kv_offloading_disk": "DISK", "num_offload_disk_blocks": 200},
], ids=["host", "disk"])
def test_greedy_tokens_are_the_same_with_blocks_loaded_back_from_a_tier(
        without_tiers, tiers, tmp_path):
    if tiers.get("kv_offloading_disk"):
        tiers = tiers | {"kv_offloading_disk": str(tmp_path)}
    tokens, cached, stats = _conversations(tiers)
    plain_tokens, plain_cached, _ = without_tiers
    assert tokens == plain_tokens
    assert sum(plain_cached[6:]) == 0  # without tiers every later turn is computed again
    assert all(c >= 96 for c in cached[6:])  # with them, each finds its history
    medium = DISK if "kv_offloading_disk" in tiers else HOST
    assert stats.kv_offload_hits[medium] > 0
    assert stats.prefix_cache_hits == sum(cached)
    if medium == DISK:
        assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped


def _completion(url: str, prompt: list[int], **fields) -> tuple[list[list[int]], int]:
    """(each choice's greedy token ids, the prompt's cached tokens)."""
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
        **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    return ([c["token_ids"] for c in body["choices"]],
            body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_a_server_reports_the_host_tiers_hits_as_cached_tokens_and_in_its_metrics(tmp_path):
    """40 device blocks: five 200-token prompts push the first one out of the pool, to the
    host tier; asked again (n = 2), it is loaded back (cached_tokens, the same tokens), a
    salted copy never finds it, and /metrics count the hits and the bytes both ways."""
    server = ServerProcess(tmp_path, "--num-gpu-blocks-override", "40",
                           "--kv-offloading-size", "0.01")
    try:
        first = random_prompt(3)
        [expected], _ = _completion(server.url, first)
        for i in range(5):
            complete(server.url, random_prompt(10 + i, 200))
        assert _completion(server.url, first, cache_salt="another tenant")[1] == 0
        for i in range(5):  # the first prompt and its salted copy go to the host tier
            complete(server.url, random_prompt(20 + i, 200))
        assert _completion(server.url, first, n=2) == ([expected, expected], 96)
        tiers = httpx.get(f"{server.url}/dashboard/snapshot").json()["kv"]["tiers"]
        assert set(tiers) == {"CPU"} and 12 <= tiers["CPU"]["blocks"] <= tiers["CPU"]["capacity"]
        text = httpx.get(f"{server.url}/metrics").text
        assert 'strata:kv_offload_hits_total{medium="CPU",model_name="stories"} 96.0' in text
        for transfer in ("GPU_to_CPU", "CPU_to_GPU"):
            moved = re.search(rf'vllm:kv_offload_total_bytes_total\{{model_name="stories",'
                              rf'transfer_type="{transfer}"\}} (\S+)', text)
            assert moved and float(moved.group(1)) > 0, transfer
    finally:
        assert server.stop() == 0, server.log_text()


@pytest.mark.timeout(120)
def test_two_tensor_parallel_ranks_each_move_their_shard_with_the_same_tokens(without_tiers):
    tokens, cached, stats = _conversations({"num_offload_blocks": 200,
                                            "tensor_parallel_size": 2})
    assert tokens == without_tiers[0]
    assert all(c >= 96 for c in cached[6:]) and stats.kv_offload_hits[HOST] > 0


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_host_tier_is_resident_from_the_start_and_the_disk_tier_is_not(tmp_path):
    """Taken at start (a filling tier cannot run the host out of memory later, and no copy
    pays for first touches); the disk tier stays a sparse file until written."""
    pool = torch.zeros(2, 2, 4, BS, 2, 8)
    host_bytes = 64 * 2**20
    host_blocks = host_bytes // (pool[:, :, 0].numel() * pool.element_size())
    before = _resident_bytes()
    stores = TierStores(pool, host_blocks, str(tmp_path), 2 * host_blocks)
    grown = _resident_bytes() - before
    assert stores.stores[HOST].nbytes == host_bytes
    assert host_bytes <= grown < 1.5 * host_bytes  # the disk tier's 128 MiB are not read in


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_block_copy_kernel_moves_the_same_bytes_as_torch(dtype):
    kernel = kv_blocks_kernel()
    assert kernel is not None
    source = torch.randn(3, 2, 10, BS, 2, 8).to(dtype)
    target = torch.randn(3, 2, 7, BS, 2, 8).to(dtype)
    expected = target.clone()
    source_slots, target_slots = torch.tensor([9, 0, 4, 5]), torch.tensor([2, 6, 0, 3])
    expected.index_copy_(2, target_slots, source.index_select(2, source_slots))
    kernel.copy_blocks(source, target, source_slots, target_slots)
    assert torch.equal(target, expected)


def test_the_block_copy_kernel_refuses_bad_slots_and_shapes_writing_nothing():
    kernel = kv_blocks_kernel()
    source, target = torch.randn(2, 2, 4, BS, 2, 8), torch.zeros(2, 2, 6, BS, 2, 8)
    cases = [((torch.tensor([0, 1]), torch.tensor([5, 6])), "target slot 6 is out"),
             ((torch.tensor([-1]), torch.tensor([0])), "source slot -1 is out"),
             ((torch.tensor([0, 1]), torch.tensor([0])), "as many source as target"),
             ((torch.tensor([0], dtype=torch.int32), torch.tensor([0])), "int64")]
    for (source_slots, target_slots), reason in cases:
        with pytest.raises(RuntimeError, match=reason):
            kernel.copy_blocks(source, target, source_slots, target_slots)
    with pytest.raises(RuntimeError, match="same shape"):
        kernel.copy_blocks(source, torch.zeros(2, 2, 6, BS, 4, 8), torch.tensor([0]),
                           torch.tensor([0]))
    none = torch.tensor([], dtype=torch.int64)  # a step with no copies, an empty store
    kernel.copy_blocks(torch.zeros(2, 2, 0, BS, 2, 8), target, none, none)
    assert not target.any()


@pytest.mark.timeout(60)
def test_a_host_tier_past_the_hosts_memory_is_refused_at_start_with_a_reason():
    """Taken at start, a tier larger than the host's memory would be the OOM killer's end;
    it is a clear error before any of it is allocated."""
    with pytest.raises(ValueError, match="lower --kv-offloading-size"):
        LLM(str(STORIES), num_kv_blocks=32, kv_offloading_size=float(1 << 16))  # 64 TiB
