"""Building blocks of the Llama family: linear layers, RMSNorm, rotary embedding, MLP."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.cpu_kernels import fused_ops_kernel, skinny_linear_kernel
from strata.model.parallel import SINGLE, TensorParallel

logger = logging.getLogger(__name__)


ONEDNN_BATCH_HINT = 32  # the rows oneDNN lays a packed weight out for (good from 1 to 512)
CALIBRATION_ROWS = (1, 8, 32)  # decode batches a CPU linear kernel is chosen on
# A weight past any CPU's last-level cache reads at memory speed whatever its size: a
# larger one (a vocabulary's head) is timed on its first outputs, for half the start time.
CALIBRATION_BYTES = 64 << 20


class Linear(nn.Linear):
    """nn.Linear without random initialisation (the checkpoint overwrites every weight).

    On CPU in float32 the weight can be packed once for a faster product than F.linear's,
    which for the few rows of a decode step re-reads the [out, in] weight poorly (on an
    AVX2 EPYC: 7 GB/s of a 16 GB/s machine for a 32000x256 head at one row, 4x slower
    than its own single row at eight): "onednn" (torch's oneDNN linear over a weight
    reordered for it) or "skinny" (the C++ kernel of csrc/skinny_linear.cpp). With
    --quantization int8 the weight is packed as int8 with a scale per output instead:
    "int8" (the same C++ kernel, widening each vector in registers) or "int8-torch"
    (torch's _weight_int8pack_mm). With --dtype bfloat16 on CPU it is packed as bfloat16:
    "bf16" (the same kernel again, in float32 arithmetic) or, where the CPU multiplies
    bfloat16 (AMX, AVX512-BF16), "onednn-bf16" (oneDNN's product over a weight reordered
    for it, its input rounded to bfloat16 and its output widened back). Which one, per
    weight shape, is measured at start (choose_cpu_linear_kernels).
    """

    kernel: str = "torch"
    packed: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        pass

    def pack(self, kernel: str) -> None:
        """Swap the weight for its packed copy for `kernel` (the [out, in] weight is freed)."""
        weight = self.weight.detach()  # CPU only: no buffer to move
        self.packed = _PACK[kernel](weight)
        self.kernel = kernel
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch":
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = _PRODUCT[self.kernel](rows, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, per output channel: int8 values in [-127, 127] and each row's scale
    (its largest magnitude over 127), so that weight ~= values * scales[:, None]."""
    scales = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    values = torch.round(weight / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return values, scales


def _pack_int8(weight: torch.Tensor, pack) -> tuple[torch.Tensor, torch.Tensor]:
    values, scales = quantize_int8(weight)
    return pack(values), scales


def _onednn_bf16(rows, packed, bias, _) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(rows.to(torch.bfloat16), packed, None, "none",
                                             [], "").float()
    return out if bias is None else out.add_(bias)


def _int8_torch(rows, packed, bias, _) -> torch.Tensor:
    out = torch._weight_int8pack_mm(rows.contiguous(), *packed)
    return out if bias is None else out.add_(bias)


_PACK = {
    "torch": lambda w: w,
    "onednn": lambda w: torch.ops.mkldnn._reorder_linear_weight(w, ONEDNN_BATCH_HINT),
    "skinny": lambda w: skinny_linear_kernel().pack_weight(w),
    "int8": lambda w: _pack_int8(w, skinny_linear_kernel().pack_weight),
    "int8-torch": lambda w: _pack_int8(w, torch.Tensor.contiguous),
    "bf16": lambda w: skinny_linear_kernel().pack_weight(w.to(torch.bfloat16)),
    "onednn-bf16": lambda w: torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16),
                                                                    ONEDNN_BATCH_HINT),
    # Where the C++ kernel is missing: the same values, kept in float32 for F.linear.
    "bf16-torch": lambda w: w.to(torch.bfloat16).float(),
}
_PRODUCT = {
    "torch": lambda rows, weight, bias, _: F.linear(rows, weight, bias),
    "onednn": lambda rows, packed, bias, _: torch.ops.mkldnn._linear_pointwise(
        rows, packed, bias, "none", [], ""),
    "skinny": lambda rows, packed, bias, out: skinny_linear_kernel().packed_linear(
        rows, packed, bias, out),
    "int8": lambda rows, packed, bias, out: skinny_linear_kernel().packed_linear_int8(
        rows, *packed, bias, out),
    "int8-torch": _int8_torch,
    "bf16": lambda rows, packed, bias, out: skinny_linear_kernel().packed_linear_bf16(
        rows, packed, bias, out),
    "onednn-bf16": _onednn_bf16,
}
_PRODUCT["bf16-torch"] = _PRODUCT["torch"]  # over the rounded weight, kept in float32


def packable_linears(model: nn.Module) -> list[Linear]:
    """The Linears a CPU kernel can take (CPU, float32). A weight shared with an embedding
    stays as it is: lookups read its [out, in] rows."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or linears[0].weight.device.type != "cpu" \
            or linears[0].weight.dtype != torch.float32:
        return []
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m for m in linears if id(m.weight) not in shared]


def cpu_linear_kernels(weight_format: str | None = None) -> list[str]:
    """The kernels this machine has for the weights' format (None: float32; "int8";
    "bfloat16"), the reference first: torch's own product in float32 (the only one with
    STRATA_LINEAR=torch), torch's int8 product under int8; under bfloat16 the C++ kernel
    (or F.linear over the rounded values where it is missing) and oneDNN's where the CPU
    multiplies bfloat16."""
    if weight_format == "int8":
        return ["int8-torch"] + (["int8"] if skinny_linear_kernel() is not None else [])
    if weight_format == "bfloat16":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return ["bf16" if skinny_linear_kernel() is not None else "bf16-torch"] + \
            (["onednn-bf16"] if native and torch.backends.mkldnn.is_available() else [])
    kernels = ["torch"]
    if os.environ.get("STRATA_LINEAR", "auto") == "torch":
        return kernels
    if torch.backends.mkldnn.is_available():
        kernels.append("onednn")
    if skinny_linear_kernel() is not None:
        kernels.append("skinny")
    return kernels


def choose_cpu_linear_kernels(linears: list[Linear], weight_format: str | None = None,
                              cache_file: Path | None = None) -> dict[tuple[int, ...], str]:
    """For each weight shape, the fastest kernel on this CPU over decode batches of
    CALIBRATION_ROWS rows, timed on random weights: the values play no part, so this runs
    before the checkpoint is in (while it streams). Narrower weights (int8, bfloat16)
    always get a kernel of their format, even where there is only one. With a
    `cache_file`, a shape timed before on this machine (same CPU, threads, torch and kernel
    build) is not timed again: a wide model's timing takes seconds of its start."""
    kernels = cpu_linear_kernels(weight_format)
    if len(kernels) == 1:
        return dict.fromkeys((tuple(m.weight.shape) for m in linears), kernels[0]) \
            if weight_format else {}
    reference = kernels[0]
    key = _machine_key(kernels)
    cached = _read_cache(cache_file).get(key, {}) if cache_file else {}
    choice, lines, timed = {}, [], False
    for shape in sorted({tuple(m.weight.shape) for m in linears}):
        name = "x".join(map(str, shape))
        if name in cached:
            choice[shape] = cached[name]
            lines.append(f"{name} {cached[name]} (cached)")
            continue
        timed = True
        timed_outputs = max(1, min(shape[0], CALIBRATION_BYTES // (4 * shape[1])))
        slowdowns = kernel_slowdowns(torch.randn(timed_outputs, shape[1]), kernels)
        fastest = min(slowdowns, key=slowdowns.get)
        choice[shape] = cached[name] = fastest
        lines.append(f"{name} {fastest} "
                     f"({slowdowns[reference] / slowdowns[fastest]:.1f}x {reference}'s)")
    if choice:
        logger.info("CPU linear kernels, by weight: %s", ", ".join(lines))
    if cache_file and timed:  # a start that timed nothing leaves the file alone
        _write_cache(cache_file, key, cached)
    return choice


def _machine_key(kernels: list[str]) -> str:
    """What a timing depends on: the CPU, the threads, torch, and the C++ kernel's build
    (a rebuilt kernel is timed afresh)."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    parts = [cpu, f"{torch.get_num_threads()} threads", f"torch {torch.__version__}",
             ",".join(kernels)]
    if (module := skinny_linear_kernel()) is not None:
        stat = os.stat(module.__file__)
        parts.append(f"build {stat.st_size}-{stat.st_mtime_ns}")
    return " | ".join(parts)


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: time everything
        return {}


def _write_cache(path: Path, key: str, choices: dict[str, str]) -> None:
    """Merged into what is there and replaced at once (starts may run side by side); a
    cache that cannot be written (a read-only home) only costs the next start its timing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path) | {key: choices}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as part:
            json.dump(entries, part, indent=1)
        os.replace(part.name, path)
    except OSError as exc:
        logger.debug("CPU linear kernel choices not cached (%s)", exc)


def kernel_slowdowns(weight: torch.Tensor, kernels: list[str], rounds: int = 3,
                     round_seconds: float = 0.005) -> dict[str, float]:
    """Each kernel's time for one product over the fastest kernel's, averaged over the
    batches of CALIBRATION_ROWS rows: each batch size counts alike (a sum of seconds would
    let the largest decide alone, and the single stream is where a step is shortest).
    Times are the best of alternating rounds (the machine may be shared), each about
    `round_seconds` long per product, so a start spends a fraction of a second here
    whatever the weights' sizes."""
    out = weight.shape[0]
    packed = {k: _PACK[k](weight) for k in kernels}
    products = {(k, rows): functools.partial(_PRODUCT[k], torch.randn(rows, weight.shape[1]),
                                             packed[k], None, out)
                for rows in CALIBRATION_ROWS for k in kernels}
    for product in products.values():  # first calls set libraries up: not timed
        product()
    best = dict.fromkeys(products, float("inf"))
    calls = dict.fromkeys(products, 1)

    def slowdown(kernel: str) -> float:
        return sum(best[kernel, rows] / min(best[k, rows] for k in kernels)
                   for rows in CALIBRATION_ROWS) / len(CALIBRATION_ROWS)

    for round_ in range(rounds + 1):  # the first round, of one call each, sizes the others
        for key, product in products.items():
            started = time.perf_counter()
            for _ in range(calls[key]):
                product()
            best[key] = min(best[key], (time.perf_counter() - started) / calls[key])
            if round_ == 0:
                calls[key] = max(1, min(20, int(round_seconds / best[key])))
        if round_ == 0:  # a kernel twice as slow as the fastest is out: no more time on it
            fastest = min(map(slowdown, kernels))
            products = {key: p for key, p in products.items()
                        if slowdown(key[0]) < 2 * fastest}
    return {k: slowdown(k) for k in kernels}


def weight_packer(model: nn.Module, kernels: dict[tuple[int, ...], str]
                  ) -> Callable[[str], None]:
    """load_weights' on_complete: each packable Linear's weight packed for its kernel as
    soon as it is loaded, while the rest of the checkpoint still streams."""
    packable = {id(module) for module in packable_linears(model)}
    by_weight = {f"{name}.weight": module for name, module in model.named_modules()
                 if id(module) in packable}

    def pack(name: str) -> None:
        module = by_weight.get(name)
        if module is not None and \
                (kernel := kernels.get(tuple(module.weight.shape), "torch")) != "torch":
            module.pack(kernel)

    return pack


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


def fused_ops(*tensors: torch.Tensor):
    """The C++ fused ops (csrc/fused_ops.cpp) where every tensor is a float32 CPU one,
    else None: the PyTorch path."""
    for tensor in tensors:  # a loop, not all(...): this runs several times a layer
        if not tensor.is_cpu or tensor.dtype != torch.float32:
            return None
    return fused_ops_kernel()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x normalised; with `residual`, (norm(x + residual), x + residual): the decoder's
        residual add fused in (vLLM's way), which may update `residual` in place."""
        shape, dim = x.shape, x.shape[-1]
        kernel = fused_ops(x, self.weight)
        if residual is None:
            if kernel is None:
                return F.rms_norm(x, (dim,), self.weight, self.eps)
            return kernel.rms_norm(x.reshape(-1, dim), self.weight, self.eps).view(shape)
        if kernel is None or not residual.is_contiguous():
            residual = x + residual
            return F.rms_norm(residual, (dim,), self.weight, self.eps), residual
        out = kernel.add_rms_norm(x.reshape(-1, dim), residual.view(-1, dim), self.weight,
                                  self.eps)
        return out.view(shape), residual


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
