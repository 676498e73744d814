"""Building blocks of the Llama family: linear layers, RMSNorm, rotary embedding, MLP."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.cpu_kernels import skinny_linear_kernel
from strata.model.parallel import SINGLE, TensorParallel

logger = logging.getLogger(__name__)


class Linear(nn.Linear):
    """nn.Linear without random initialisation (the checkpoint overwrites every weight).

    On CPU in float32 the weight is then packed for the C++ kernel (see
    csrc/skinny_linear.cpp): MKL's GEMM re-packs the weight on every call, which for the few
    rows of a decode step costs more than the product. Once packed, the kernel does every
    product, decode steps and prompt chunks alike.
    """

    packed: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        pass

    def pack(self, kernel) -> None:
        """Swap the weight for its packed copy (the [out, in] weight is freed)."""
        self.packed = kernel.pack_weight(self.weight.detach())  # CPU only: no buffer to move
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = skinny_linear_kernel().packed_linear(rows, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)


def packable_linears(model: nn.Module) -> list[Linear]:
    """The Linears the CPU kernel can take (CPU, float32, kernel built). A weight shared
    with an embedding stays as it is: lookups read its [out, in] rows."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or linears[0].weight.device.type != "cpu" \
            or linears[0].weight.dtype != torch.float32 or skinny_linear_kernel() is None:
        return []
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in linears if id(m.weight) not in shared]


def cpu_linear_kernel_pays(linears: list[Linear]) -> bool:
    """Whether the packed kernel beats torch's product on this CPU for a decode step's one
    row, timed on the widest weight's shape. The weight's values play no part, so this runs
    before the checkpoint is in (while it streams)."""
    if not linears:
        return False
    widest = max(linears, key=lambda m: m.weight.numel()).weight
    packed_s, torch_s = kernel_vs_torch_seconds(skinny_linear_kernel(),
                                                torch.randn(widest.shape))
    if packed_s >= torch_s:
        # Seen on AVX2-only CPUs: 5-10x slower than torch's product, every row count.
        logger.warning("the packed CPU linear kernel is %.1fx slower than torch's on this "
                       "CPU (%.0f vs %.0f us for a %s weight, one row): using torch's",
                       packed_s / torch_s, 1e6 * packed_s, 1e6 * torch_s,
                       "x".join(map(str, widest.shape)))
        return False
    return True


def pack_linears(linears: list[Linear]) -> None:
    for module in linears:
        module.pack(skinny_linear_kernel())


def kernel_vs_torch_seconds(kernel, weight: torch.Tensor, rounds: int = 5,
                            round_seconds: float = 0.01) -> tuple[float, float]:
    """Seconds per one-row product, packed kernel and F.linear: the best of alternating
    rounds (the machine may be shared), each about `round_seconds` long, so that a start
    spends a fraction of a second here whatever the weight's size and the kernel's speed."""
    packed = kernel.pack_weight(weight)
    row = torch.randn(1, weight.shape[1])
    products = (lambda: kernel.packed_linear(row, packed, None, weight.shape[0]),
                lambda: F.linear(row, weight))
    best = [float("inf"), float("inf")]
    calls = 1
    for round_ in range(rounds + 1):  # the first round, of one call each, sizes the others
        for i, product in enumerate(products):
            started = time.perf_counter()
            for _ in range(calls):
                product()
            best[i] = min(best[i], (time.perf_counter() - started) / calls)
        if round_ == 0:
            calls = max(1, min(20, int(round_seconds / max(best))))
    return best[0], best[1]


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class VocabParallelEmbedding(Embedding):
    """This rank's rows of the vocabulary, [start, start + rows): other ids look up zeros,
    and the sum over the ranks is the whole lookup."""

    def __init__(self, rows: int, hidden: int, start: int, tp: TensorParallel) -> None:
        super().__init__(rows, hidden)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies for the rope types Llama-family checkpoints use."""
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), with a cos/sin table per position."""

    def __init__(self, head_dim: int, max_positions: int, rope: dict) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a step's positions, [tokens, 1, head_dim / 2]: once per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] by the step's angles (in float32, as HF does)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul. Under tensor
    parallelism `intermediate` is this rank's share: gate/up hold its rows, down_proj its
    columns, and the ranks' partial products are summed."""

    def __init__(self, hidden: int, intermediate: int, bias: bool,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.intermediate, self.tp = intermediate, tp
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))
