"""BenchConfig: everything one `strata bench serve` run needs, checked once up front."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BACKENDS = ("openai", "openai-chat")  # vLLM's names: /v1/completions and /v1/chat/completions
WORKLOADS = ("random", "shared-prefix", "multi-turn")
PROMPT_FORMATS = ("text", "ids")
GROUP_ORDERS = ("interleaved", "random")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass
class BenchConfig:
    base_url: str
    model: str  # the name the server serves, sent as "model"
    backend: str | None = None  # None: inferred from endpoint (chat if it ends in chat/completions)
    endpoint: str | None = None  # None: the backend's usual path
    workload: str = "random"
    num_prompts: int = 100  # random and shared-prefix; multi-turn sends conversations x turns
    # random: lengths uniform in [len * (1 - ratio), len * (1 + ratio)], as in vLLM
    random_input_len: int = 256
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    # shared-prefix
    num_groups: int = 4
    prefix_len: int = 256
    suffix_len: int = 32
    # interleaved: request i is group i % num_groups; random: the same requests, shuffled
    group_order: str = "interleaved"
    # multi-turn
    num_conversations: int = 8
    num_turns: int = 4
    turn_len: int = 64
    output_len: int = 128  # shared-prefix and multi-turn
    # load
    request_rate: float = math.inf  # Poisson arrivals per second; inf sends all at once
    max_concurrency: int | None = None
    num_warmups: int = 1
    timeout: float = 600.0  # seconds without a byte from the server before a request fails
    seed: int = 0
    # prompts and body
    tokenizer: str | None = None  # folder with tokenizer.json; None: one word ~ one token
    prompt_format: str = "text"
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    api_key: str | None = None
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.backend is None:
            chat = (self.endpoint or "").rstrip("/").endswith("chat/completions")
            self.backend = "openai-chat" if chat else "openai"
        if self.endpoint is None:
            self.endpoint = CHAT_PATH if self.chat else COMPLETIONS_PATH
        _check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}")
        _check(self.workload in WORKLOADS, f"workload must be one of {WORKLOADS}")
        _check(self.prompt_format in PROMPT_FORMATS, f"prompt format must be one of "
               f"{PROMPT_FORMATS}")
        _check(self.prompt_format == "text" or self.tokenizer is not None,
               "--prompt-format ids needs --tokenizer")
        _check(self.prompt_format == "text" or not self.chat,
               "chat requests take text: use --prompt-format text")
        _check(self.group_order in GROUP_ORDERS, f"group order must be one of {GROUP_ORDERS}")
        _check(0.0 <= self.random_range_ratio < 1.0, "--random-range-ratio must be in [0, 1)")
        _check(self.request_rate > 0, "--request-rate must be positive (inf: all at once)")
        _check(self.max_concurrency is None or self.max_concurrency >= 1,
               "--max-concurrency must be at least 1")
        counts = (self.num_prompts, self.random_input_len, self.random_output_len,
                  self.num_groups, self.prefix_len, self.suffix_len, self.num_conversations,
                  self.num_turns, self.turn_len, self.output_len)
        _check(min(counts) >= 1, "counts and lengths must be at least 1")
        _check(self.num_warmups >= 0 and self.timeout > 0, "bad --num-warmups or --timeout")

    @property
    def chat(self) -> bool:
        return self.backend == "openai-chat"

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        path = self.endpoint if self.endpoint.startswith("/") else f"/{self.endpoint}"
        if base.endswith("/v1") and path.startswith("/v1/"):  # --base-url given as .../v1
            base = base[:-3]
        return base + path


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
