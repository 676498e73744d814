"""Building blocks of the Llama family: linear layers, RMSNorm, rotary embedding, MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.cpu_kernels import skinny_linear_kernel

# Decode batches are a few rows, and for those MKL runs x @ W.T poorly on CPU: it packs the
# weight on every call, and its one-row (matrix-vector) path is slower still. Up to
# KERNEL_ROWS rows a small C++ kernel does the product from the weight stored transposed.
KERNEL_ROWS = 64


class Linear(nn.Linear):
    """nn.Linear without random initialisation (the checkpoint overwrites every weight), and
    with the small-batch CPU kernel once its weight is stored transposed."""

    def reset_parameters(self) -> None:
        pass

    def store_transposed(self) -> None:
        """Lay the weight's memory out as [in, out] (its shape stays [out, in]): the kernel
        reads 16 neighbouring outputs as one vector, and F.linear becomes a plain x @ wt."""
        self.weight.data = self.weight.data.t().contiguous().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else 0
        if 0 < rows <= KERNEL_ROWS and self.weight.stride(0) == 1 \
                and (kernel := skinny_linear_kernel()) is not None:
            return kernel.skinny_linear(x, self.weight.t(), self.bias)
        return F.linear(x, self.weight, self.bias)


def use_cpu_linear_kernel(model: nn.Module) -> None:
    """Store every Linear transposed for the kernel, where it can run (CPU, float32, built).
    A weight shared with an embedding stays as it is: lookups read its [out, in] rows."""
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    if not weights or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32 \
            or skinny_linear_kernel() is None:
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, Linear) and id(module.weight) not in shared:
            module.store_transposed()


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


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
    """SwiGLU MLP with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
