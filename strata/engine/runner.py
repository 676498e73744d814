"""ModelRunner: owns the model and the KV pool; turns a scheduled step into tokens.

Each step is one flattened batch: every scheduled request contributes its new
tokens (a prompt chunk, or one token to decode). Inputs are built with numpy
over the whole batch; logits are computed only for the rows that sample, and
what they sampled comes back as Python lists, one row per sampling request.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from strata.checkpoint import load_json, user_cache_dir
from strata.config import EngineConfig
from strata.engine.kv_offload.copies import BlockCopies
from strata.engine.kv_offload.stores import TierStores
from strata.engine.messages import TokenLogprobs
from strata.engine.request import Request
from strata.engine.step_batch import StepBatch
from strata.math_utils import cdiv
from strata.model.attention import AttentionGroup, AttentionMetadata, SharedPrefix
from strata.model.layers import choose_cpu_linear_kernels, packable_linears, weight_packer
from strata.model.loader import PlacementTimes
from strata.model.parallel import SINGLE, TensorParallel
from strata.model.registry import build_model, load_weights, resolve_device, resolve_dtype
from strata.model.safetensors_stream import WeightStream
from strata.model.sampler import Sampler, SamplerOutput, SamplingMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # flat index of the last token of each sampling request


@dataclass
class ModelRunnerOutput:
    """What one step sampled: a row per request that reached the end of its tokens, in the
    order the step scheduled them (prompt chunks that are not a prompt's last have none)."""

    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None  # None: no request asked for any


def kv_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The KV pool, one tensor for all layers: [layers, K and V, blocks, block_size,
    kv_heads, head_dim]. Zeroed, not empty: attention reads whole blocks and masks the
    unused slots, and 0 * NaN from stale memory would still poison the output. On CPU it is
    an anonymous mapping, whose pages the kernel hands out zeroed when first written: a
    start pays nothing for gigabytes of pool (zeroing them took seconds), as vLLM's CPU pool
    (torch.empty) does not either, but with the zeros guaranteed. On a GPU, a memset."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_available_memory() -> int:
    """What the host can still hand out, the page cache it would drop included (Linux's
    MemAvailable); free pages alone where /proc/meminfo does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return available_memory(torch.device("cpu"))


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, tp: TensorParallel = SINGLE,
                 weights: WeightStream | None = None) -> None:
        """`weights`: the checkpoint's stream if the caller started it already (the engine
        process does, before it imports torch); else it starts here, first thing."""
        self.config = config
        weights = weights or WeightStream(config.model, model_path)
        try:
            self._load(config, model_path, tp, weights)
        except BaseException:
            weights.close()  # its readers stop; nothing more is read
            raise
        self.model.bind_kv_caches(self.kv_caches)
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))

    def _load(self, config: EngineConfig, model_path: Path, tp: TensorParallel,
              weights: WeightStream) -> None:
        hf_config = load_json(model_path / "config.json")
        self.tp = tp
        self.device = resolve_device(config.device, tp.rank % config.parallel.ranks_per_node)
        self.dtype = resolve_dtype(config.dtype, self.device, hf_config)
        if config.quantization and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(f"--quantization {config.quantization} runs on CPU with float32 "
                             f"activations (--dtype auto or float32), not {self.dtype} on "
                             f"{self.device.type}")
        self.kv_dtype = self.dtype if config.cache.kv_cache_dtype == "auto" else \
            resolve_dtype(config.cache.kv_cache_dtype, self.device, hf_config)
        weight_format = config.quantization
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            # bfloat16 weights (half the bytes a decode step reads), float32 activations,
            # as llama.cpp runs 16-bit weights on a CPU: each product widens its weights,
            # or rounds its input for oneDNN where the CPU multiplies bfloat16 (Linear).
            # torch's bfloat16 layers were 1.4-2.8x slower (docs/benchmarks.md, issue 20).
            self.dtype, weight_format = torch.float32, "bfloat16"
        self.model = build_model(model_path, self.dtype, self.device, self.tp)
        args = self.model.args
        # This rank's KV heads only: at N ranks the same memory holds about N x the tokens.
        self.num_kv_heads = self.model.shapes.num_kv_heads
        self.vocab_size = args.vocab_size
        self.max_model_len = config.max_model_len or args.max_position_embeddings
        if self.max_model_len > args.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {args.max_position_embeddings}")
        self.block_size = config.cache.block_size
        # Every rank must have as many blocks as rank 0's scheduler hands out.
        self.num_blocks = tp.min_over_ranks(self._num_blocks())
        shape = (args.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                 args.head_dim)
        started = time.monotonic()
        self.kv_caches = kv_pool(shape, self.kv_dtype, self.device)
        self.num_offload_blocks, self.num_offload_disk_blocks = self._num_tier_blocks(tp)
        self.copy_seconds: Counter[str] = Counter()  # by transfer type, cumulative
        self.tier_stores = TierStores(self.kv_caches, self.num_offload_blocks,
                                      config.cache.kv_offloading_disk,
                                      self.num_offload_disk_blocks) \
            if self.num_offload_blocks else None
        allocated = time.monotonic()
        self.linear_kernels = choose_cpu_linear_kernels(
            packable_linears(self.model), weight_format,
            user_cache_dir() / "linear-kernels.json")
        calibrated = time.monotonic()
        times = PlacementTimes()
        # Each weight packed for its CPU kernel as it lands, while later ones still stream.
        load_weights(self.model, weights, times, weight_packer(self.model, self.linear_kernels))
        # Where a start's time went (EngineReady reports it; the benchmark prints it).
        self.startup_seconds = {"weights_read": weights.read_seconds or 0.0,
                                "weights_wait": times.wait_seconds,
                                "weights_place": times.place_seconds,
                                "kv_allocate": allocated - started,
                                "kernels": calibrated - allocated}

    @property
    def bytes_per_block(self) -> int:
        a = self.model.args
        return 2 * a.num_layers * self.block_size * self.num_kv_heads * a.head_dim * \
            self.kv_dtype.itemsize

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            num_blocks = cache.num_kv_blocks
        else:
            # A GPU is the rank's alone; host memory is shared with everything else, the
            # other ranks of this machine included.
            fraction = 0.8 if self.device.type == "cuda" else \
                0.2 / self.config.parallel.ranks_per_node
            budget = cache.kv_cache_memory or int(fraction * self._free_memory())
            # More blocks than max_num_seqs full-length sequences could ever hold is waste.
            ceiling = self.config.scheduler.max_num_seqs * cdiv(self.max_model_len, self.block_size)
            num_blocks = min(budget // self.bytes_per_block, ceiling)
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than "
                f"max_model_len {self.max_model_len}: raise --kv-cache-memory or lower "
                f"--max-model-len")
        return num_blocks

    def _num_tier_blocks(self, tp: TensorParallel) -> tuple[int, int]:
        """Blocks of the host and disk tiers (every rank alike: rank 0's index is theirs)."""
        cache = self.config.cache
        if not cache.offloading:
            return 0, 0
        host = cache.num_offload_blocks or int(cache.kv_offloading_size * 2**30) // \
            self.bytes_per_block
        disk = cache.num_offload_disk_blocks or (cache.kv_offloading_disk_size or 0) // \
            self.bytes_per_block
        if host < 1 or (cache.kv_offloading_disk is not None and disk < 1):
            raise ValueError(f"a KV tier smaller than one block ({self.bytes_per_block} "
                             f"bytes here): raise --kv-offloading-size or "
                             f"--kv-offloading-disk-size")
        # The host tier is taken at start (stores.host_store): past what the host has, it
        # would be the kernel's OOM killer, not this message, that stopped the engine.
        wanted = host * self.bytes_per_block * self.config.parallel.ranks_per_node
        available = host_available_memory()
        if self.device.type == "cpu":  # pages the weights and the pool will take
            available -= self._weight_bytes() + self.kv_caches.nbytes
        if wanted > available:
            raise ValueError(f"the host KV tier needs {wanted / 2**30:.2f} GiB, more than the "
                             f"host has available ({max(0, available) / 2**30:.2f} GiB once "
                             f"the weights and the KV pool are in): lower "
                             f"--kv-offloading-size")
        return tp.min_over_ranks(host), tp.min_over_ranks(disk) if disk else 0

    def copy_blocks(self, copies: BlockCopies) -> None:
        """Every rank: a step's copies between the KV tiers, before the step runs."""
        self.copy_seconds.update(self.tier_stores.apply(copies))

    def _free_memory(self) -> int:
        """Free memory once the weights are in: on CPU their pages are not yet touched."""
        free = available_memory(self.device)
        if self.device.type == "cpu":
            free -= self._weight_bytes()
        return max(0, free)

    def _weight_bytes(self) -> int:
        return sum(p.nbytes for p in {p.data_ptr(): p for p in self.model.parameters()}.values())

    @torch.inference_mode()
    def execute(self, batch: StepBatch, requests: list[Request]) -> ModelRunnerOutput:
        """Rank 0: run the step and sample for the requests that are due (`requests` are
        the batch's rows)."""
        logits = self.forward(batch)
        if logits is None:
            return ModelRunnerOutput([])
        sampling_requests = [r for r, s in zip(requests, batch.sampling, strict=True) if s]
        sampled = self.sampler(logits, self.sampling_metadata(sampling_requests))
        return ModelRunnerOutput(sampled.token_ids.tolist(),
                                 _logprobs_per_row(sampled, sampling_requests))

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor | None:
        """Every rank: run the model over the step's tokens (writing their K/V) and return,
        on rank 0, the logits of the rows that sample; None if none does, and on the
        other ranks."""
        inputs = self.prepare_inputs(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention)
        if not len(inputs.logits_indices):
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def prepare_inputs(self, batch: StepBatch) -> StepInputs:
        starts, counts, block_tables = batch.starts, batch.counts, batch.block_tables
        first_token = np.concatenate(([0], np.cumsum(counts)[:-1]))
        total = len(batch.input_ids)
        owner = np.repeat(np.arange(len(counts)), counts)
        positions = starts[owner] + np.arange(total) - first_token[owner]
        slots = block_tables[owner, positions // self.block_size] * self.block_size + \
            positions % self.block_size
        groups = [self._group(rows, starts, counts, first_token, block_tables)
                  for rows in _by_query_length(counts)]
        device = self.device
        sampling = batch.sampling
        last_tokens = first_token[sampling] + counts[sampling] - 1
        return StepInputs(
            input_ids=torch.from_numpy(batch.input_ids).to(device),
            positions=torch.from_numpy(positions).to(device),
            attention=AttentionMetadata(torch.from_numpy(slots).to(device), groups),
            logits_indices=torch.from_numpy(last_tokens).to(device),
        )

    def _group(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray,
               first_token: np.ndarray, block_tables: np.ndarray) -> AttentionGroup:
        """Requests `rows`, their queries padded to the longest (pads repeat the last query)."""
        counts = counts[rows]
        max_q = int(counts.max())
        offsets = np.minimum(np.arange(max_q), counts[:, None] - 1)  # [B, max_q]
        real = np.arange(max_q) < counts[:, None]
        context_lens = starts[rows] + counts
        context = int(context_lens.max())
        device = self.device
        tables = np.ascontiguousarray(block_tables[rows, :cdiv(context, self.block_size)])
        shared, context_starts = [], np.zeros(len(rows), dtype=np.int64)
        if max_q == 1:
            for members, num_blocks in _shared_prefixes(tables, context_lens, self.block_size):
                shared.append(SharedPrefix(torch.from_numpy(members).to(device),
                                           torch.from_numpy(tables[members[0], :num_blocks])
                                           .to(device)))
                context_starts[members] = num_blocks * self.block_size
        return AttentionGroup(
            token_index=torch.from_numpy(first_token[rows][:, None] + offsets).to(device),
            query_positions=torch.from_numpy(starts[rows][:, None] + offsets).to(device),
            block_tables=torch.from_numpy(tables).to(device),
            context_lens=torch.from_numpy(context_lens).to(device),
            padded_rows=torch.from_numpy(np.flatnonzero(real)).to(device),
            flat_tokens=torch.from_numpy((first_token[rows][:, None] + offsets)[real]).to(device),
            shared_prefixes=shared, context_starts=torch.from_numpy(context_starts).to(device),
        )

    def sampling_metadata(self, requests: list[Request]) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        device, vocab = self.device, self.vocab_size

        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        uses_top_k = any(0 < p.top_k < vocab for p in params)
        uses_penalties = any(p.presence_penalty or p.frequency_penalty for p in params)
        uses_repetition = any(p.repetition_penalty != 1.0 for p in params)
        counts = seen = banned = None
        if uses_penalties or uses_repetition:
            counts = self._token_counts([r.output_token_ids for r in requests])
        if uses_repetition:
            seen = (counts > 0) | (self._token_counts([r.prompt_token_ids for r in requests]) > 0)
        under_min = [(row, r.stop_token_ids) for row, r in enumerate(requests)
                     if len(r.output_token_ids) < r.sampling_params.min_tokens and r.stop_token_ids]
        if under_min:
            banned = torch.zeros(len(requests), vocab, dtype=torch.bool, device=device)
            for row, stop_ids in under_min:
                banned[row, [t for t in stop_ids if t < vocab]] = True
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingMetadata(
            temperature=column([0.0 if g else p.temperature for g, p in zip(greedy, params)]),
            all_greedy=all(greedy),
            top_k=column([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                         torch.int64) if uses_top_k else None,
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
            generators={row: r.generator for row, r in enumerate(requests)
                        if r.generator is not None},
            presence_penalty=column([p.presence_penalty for p in params])
            if uses_penalties else None,
            frequency_penalty=column([p.frequency_penalty for p in params])
            if uses_penalties else None,
            repetition_penalty=column([p.repetition_penalty for p in params])
            if uses_repetition else None,
            output_token_counts=counts if uses_penalties else None,
            seen_tokens=seen,
            banned_tokens=banned,
            max_num_logprobs=min(max(asked), vocab) if asked else None,
        )

    def _token_counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[N, V] occurrences of each token id in each row's list, in one scatter."""
        width = max(1, max(len(t) for t in token_lists))
        padded = torch.full((len(token_lists), width), self.vocab_size, dtype=torch.int64)
        for row, tokens in enumerate(token_lists):
            padded[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        padded = padded.to(self.device)
        counts = torch.zeros(len(token_lists), self.vocab_size + 1, device=self.device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=self.device))
        return counts[:, :self.vocab_size]  # the last column counted the padding


def _logprobs_per_row(sampled: SamplerOutput, requests: list[Request]
                      ) -> list[TokenLogprobs | None] | None:
    """Each row's logprobs as lists (one transfer per tensor), cut to the top-N it asked for."""
    if sampled.sampled_logprobs is None:
        return None
    columns = (sampled.sampled_logprobs.tolist(), sampled.sampled_ranks.tolist(),
               sampled.top_ids.tolist(), sampled.top_logprobs.tolist())
    rows = []
    for request, (logprob, rank, ids, values) in zip(requests, zip(*columns), strict=True):
        wanted = request.sampling_params.logprobs
        rows.append(None if wanted is None else
                    TokenLogprobs(logprob, rank, ids[:wanted], values[:wanted]))
    return rows


def _by_query_length(counts: np.ndarray) -> list[np.ndarray]:
    """Rows grouped for attention: decodes (one query each) together, and prompt chunks by
    length within a factor of two. A group pads every query to its longest, so a 64-token
    suffix beside a 1,024-token prompt would otherwise cost as much as the prompt."""
    decodes = np.flatnonzero(counts == 1)
    chunks = np.flatnonzero(counts > 1)
    if not len(chunks):  # a decode step: np.unique costs ~25 us even on nothing
        return [decodes]
    buckets = np.ceil(np.log2(counts[chunks])).astype(np.int64)
    return ([decodes] if len(decodes) else []) + [chunks[buckets == b] for b in np.unique(buckets)]


# A shared prefix is attended apart only when that spares reading this many K/V tokens:
# below it, the extra products and the merge cost more than they save.
MIN_SHARED_TOKENS_SAVED = 2048


def _shared_prefixes(tables: np.ndarray, context_lens: np.ndarray, block_size: int
                     ) -> list[tuple[np.ndarray, int]]:
    """Sets of decodes whose block tables start with the same blocks (the prefix cache gave
    them one prefix), with the number of blocks all of them share. Each keeps at least its
    own last token outside the shared part."""
    found = []
    if len(tables) < 2:  # one decode shares with nobody (and np.unique costs ~25 us)
        return found
    first_blocks, inverse, sizes = np.unique(tables[:, 0], return_inverse=True,
                                             return_counts=True)
    for group in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(inverse == group)
        limit = int(context_lens[members].min() - 1) // block_size
        same = (tables[members, :limit] == tables[members[0], :limit]).all(axis=0)
        num_blocks = limit if same.all() else int(np.argmin(same))
        if (len(members) - 1) * num_blocks * block_size >= MIN_SHARED_TOKENS_SAVED:
            found.append((members, num_blocks))
    return found
