"""Engine configuration: what the user sets, grouped the way vLLM groups it."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# The default model: the small trained Llama the project's shared folder holds,
# beside the repository root (tests and demos never touch a model hub).
DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K")

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def parse_size(value: int | float | str) -> int:
    """Bytes, at least one, from a number or a string such as '512MiB', '4GiB', '2e9'."""
    size = value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", value)
        try:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        except (AttributeError, KeyError, ValueError):  # no match, unknown unit, not a number
            raise ValueError(f"cannot read a memory size from {value!r} "
                             f"(try '512MiB' or '4GiB')") from None
    # 0 must not pass: a budget of 0 would silently mean "the default".
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"a memory size must be a finite number of bytes, at least 1, "
                         f"not {value!r}")
    return int(size)


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("int8",)  # weight-only, per output channel (CPU)


@dataclass
class CacheConfig:
    block_size: int = 16
    # Bytes for the KV pool; None = a fraction of free memory (see kv_cache_budget).
    kv_cache_memory: int | str | None = None
    # Exact number of blocks, overriding the memory budget (tests, benchmarks).
    num_kv_blocks: int | None = None
    # The KV pool's element type (vLLM's --kv-cache-dtype): auto = the model's dtype; a
    # 16-bit type halves the pool's bytes on a float32 model (more tokens, less to read).
    kv_cache_dtype: str = "auto"
    # Share the KV blocks of common prefixes between requests (a radix tree of blocks).
    enable_prefix_caching: bool = True
    # Seeds the chained block hashes, so that every process given it names blocks alike.
    prefix_caching_hash_seed: int = 0
    # A host-memory tier under the pool, in GiB (vLLM's --kv-offloading-size): the blocks
    # the prefix cache evicts are kept there and loaded back on a hit. 0: none.
    kv_offloading_size: float = 0.0
    kv_offloading_backend: str = "native"  # vLLM's flag; the only backend is Strata's own
    # A disk tier under the host tier: a memory-mapped file in this folder, of this size.
    kv_offloading_disk: str | None = None
    kv_offloading_disk_size: int | str | None = None
    # Exact numbers of tier blocks, overriding the sizes (tests, benchmarks).
    num_offload_blocks: int | None = None
    num_offload_disk_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r} (choose from "
                             f"{', '.join(KV_CACHE_DTYPES)})")
        self._check_offloading()

    def _check_offloading(self) -> None:
        if not (math.isfinite(self.kv_offloading_size) and self.kv_offloading_size >= 0):
            raise ValueError(f"kv_offloading_size is in GiB, at least 0, not "
                             f"{self.kv_offloading_size!r}")
        if self.kv_offloading_backend != "native":
            raise ValueError(f"unknown KV offloading backend {self.kv_offloading_backend!r} "
                             f"(the one there is: native)")
        if self.kv_offloading_disk_size is not None:
            self.kv_offloading_disk_size = parse_size(self.kv_offloading_disk_size)
        sized = self.kv_offloading_disk_size is not None or \
            self.num_offload_disk_blocks is not None
        if (self.kv_offloading_disk is not None) != sized:
            raise ValueError("a disk tier needs both its folder (kv_offloading_disk) and its "
                             "size (kv_offloading_disk_size)")
        if self.kv_offloading_disk is not None and not self.offloading:
            raise ValueError("a disk tier sits under the host tier: set kv_offloading_size too")
        if self.offloading and not self.enable_prefix_caching:
            raise ValueError("KV offloading keeps the blocks the prefix cache evicts: it needs "
                             "prefix caching on")
        for name in ("num_offload_blocks", "num_offload_disk_blocks"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def offloading(self) -> bool:
        return self.kv_offloading_size > 0 or self.num_offload_blocks is not None


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    # Token budget of one step: decodes take 1 each, prompt chunks fill the rest.
    max_num_batched_tokens: int = 2048
    # Off: a prompt is scheduled whole or not at all (budget grows to fit it).
    enable_chunked_prefill: bool = True
    # Admission keeps blocks back for the running requests' future tokens,
    # estimated as remaining max_tokens x this ratio (SGLang's new_token_ratio).
    # The ratio decays while nothing is preempted and resets when something is,
    # so the engine learns how full it can run without thrashing. 0: admit while
    # blocks are free and rely on preemption alone (vLLM's policy).
    init_new_token_ratio: float = 0.3
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay_steps: int = 600
    # "lpm": waiting requests with the longest cached prefix go first (SGLang's policy);
    # "fcfs": arrival order. LPM turns to FCFS beyond lpm_max_waiting requests, and a
    # request passed over max_passed_over times goes first, so none starves.
    schedule_policy: str = "lpm"
    lpm_max_waiting: int = 128
    max_passed_over: int = 16

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule_policy must be 'lpm' or 'fcfs', not "
                             f"{self.schedule_policy!r}")
        if not 0 <= self.min_new_token_ratio <= self.init_new_token_ratio <= 1:
            raise ValueError("need 0 <= min_new_token_ratio <= init_new_token_ratio <= 1")


@dataclass
class ParallelConfig:
    """Tensor parallelism: the model sharded (Megatron-style) over tensor_parallel_size ranks,
    spread evenly over nnodes machines. Rank 0 (node 0) schedules and samples; the other
    ranks only run the model. Named as vLLM names them."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    # Where rank 0 holds the rendezvous (a TCP store) of ranks on several nodes; the ranks
    # of one machine meet in a file instead, and use neither.
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # Seconds a rank may wait for the others inside one collective of a step, and the leader
    # for an idle heartbeat's answer: a dead or stopped rank ends the group within this.
    distributed_timeout: float = 10.0

    def __post_init__(self) -> None:
        n, nodes = self.tensor_parallel_size, self.nnodes
        if n < 1 or nodes < 1:
            raise ValueError(f"tensor_parallel_size and nnodes must be at least 1, got {n} "
                             f"and {nodes}")
        if n % nodes:
            raise ValueError(f"tensor_parallel_size {n} must be a multiple of nnodes {nodes} "
                             f"(every node runs the same number of ranks)")
        if not 0 <= self.node_rank < nodes:
            raise ValueError(f"node_rank must be in [0, {nodes}), got {self.node_rank}")
        if nodes > 1 and not self.master_port:
            raise ValueError("several nodes need a --master-port (and --master-addr) that "
                             "every node can reach")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout must be positive, got "
                             f"{self.distributed_timeout}")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The global ranks this node runs."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "auto"
    # Weights stored in fewer bits (--quantization): int8 = weight-only, one scale per
    # output channel, activations in float32 (CPU).
    quantization: str | None = None
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    # Publish the prefix cache's block events (vLLM's format) on a ZMQ PUB socket here.
    kv_events_endpoint: str | None = None
    kv_events_topic: str = "kv-events"
    # Prefill/decode disaggregation: "tcp" serves and reads KV blocks over ZMQ/TCP.
    kv_connector: str | None = None
    kv_connector_host: str = "127.0.0.1"
    kv_connector_port: int = 0  # 0: any free port
    kv_lease_seconds: float = 30.0  # a finished prefill's blocks wait this long to be read
    kv_transfer_timeout: float = 10.0  # seconds a peer may stay silent before a read fails
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r} (choose from "
                             f"{', '.join(QUANTIZATIONS)})")

    @classmethod
    def create(cls, model: str = DEFAULT_MODEL, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments, as `LLM(model, **engine_args)` takes them."""
        groups = {name: {} for name in ("engine", "cache", "scheduler", "parallel")}
        owners = {f.name: "cache" for f in dataclasses.fields(CacheConfig)}
        owners |= {f.name: "scheduler" for f in dataclasses.fields(SchedulerConfig)}
        owners |= {f.name: "parallel" for f in dataclasses.fields(ParallelConfig)}
        owners |= {f.name: "engine" for f in dataclasses.fields(cls) if f.name not in groups}
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine argument {key!r}")
            groups[owners[key]][key] = value
        return cls(model=model, cache=CacheConfig(**groups["cache"]),
                   scheduler=SchedulerConfig(**groups["scheduler"]),
                   parallel=ParallelConfig(**groups["parallel"]), **groups["engine"])
