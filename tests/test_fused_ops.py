"""The C++ fused ops (RMSNorm, the residual add fused into it, rotary + KV write) equal the
PyTorch path they replace, on the strided views the model hands them; bad input is refused."""

import pytest
import torch
import torch.nn.functional as F

from strata.model.attention import write_kv
from strata.model.cpu_kernels import fused_ops_kernel
from strata.model.layers import RMSNorm, RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(fused_ops_kernel() is None,
                                reason="the C++ kernel could not be built here")


@pytest.mark.parametrize("rows, dim", [(1, 256), (3, 1000), (700, 64), (2, 5)])
def test_rms_norm_and_the_fused_add_equal_torch(rows, dim):
    torch.manual_seed(rows)
    kernel = fused_ops_kernel()
    wide = torch.randn(rows, dim + 7)
    x = wide[:, 3:3 + dim]  # rows with a stride wider than the row
    weight, eps = torch.randn(dim), 1e-5
    torch.testing.assert_close(kernel.rms_norm(x, weight, eps),
                               F.rms_norm(x, (dim,), weight, eps))
    residual = torch.randn(rows, dim)
    expected_sum = x + residual
    out = kernel.add_rms_norm(x, residual, weight, eps)
    assert torch.equal(residual, expected_sum)  # updated in place, bit for bit
    torch.testing.assert_close(out, F.rms_norm(expected_sum, (dim,), weight, eps))


def test_the_norm_module_gives_the_same_on_either_path(monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data.normal_()
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    fused_out, fused_residual = norm(x, residual.clone())
    monkeypatch.setattr("strata.model.layers.fused_ops_kernel", lambda: None)
    torch_out, torch_residual = norm(x, residual.clone())
    assert torch.equal(fused_residual, torch_residual)
    torch.testing.assert_close(fused_out, torch_out)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (48,), norm.weight, 1e-6))


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 8, 8, 32), (9, 8, 2, 16),
                                                               (40, 4, 1, 64)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_write_kv_equals_rotary_then_write_kv(tokens, heads, kv_heads, head_dim,
                                                     cache_dtype):
    """On the model's views: q and k a strided view of the qkv product, v after them; a
    16-bit cache gets what write_kv's .to() rounds to."""
    torch.manual_seed(tokens)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size)
    qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
    qk, v = qk.view(tokens, heads + kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0})(
        torch.randint(0, 512, (tokens,)))
    blocks, block_size = 8, 16
    slots = torch.randperm(blocks * block_size)[:tokens]
    caches = [torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
              for _ in range(4)]

    q_ref, k_ref = apply_rotary(qk, *rope).split([heads, kv_heads], dim=1)
    write_kv(caches[0], caches[1], k_ref, v, slots)
    fused_ops_kernel().rotary_write_kv(qk, v, *rope, caches[2].view(-1, kv_heads, head_dim),
                                       caches[3].view(-1, kv_heads, head_dim), slots, kv_heads)
    assert torch.equal(qk[:, :heads], q_ref)  # rotated in place, bit for bit
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_bad_input_is_refused_with_a_reason():
    kernel = fused_ops_kernel()
    with pytest.raises(RuntimeError, match="float32"):
        kernel.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        kernel.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    qk, v = torch.randn(1, 2, 4), torch.randn(1, 1, 4)
    cos = sin = torch.ones(1, 2)
    cache = torch.zeros(16, 1, 4)
    with pytest.raises(RuntimeError, match="out of the cache"):
        kernel.rotary_write_kv(qk, v, cos, sin, cache, cache.clone(), torch.tensor([16]), 1)
    assert torch.equal(cache, torch.zeros(16, 1, 4))  # nothing written
    with pytest.raises(RuntimeError, match="one type"):
        kernel.rotary_write_kv(qk, v, cos, sin, cache, cache.half(), torch.tensor([0]), 1)
    with pytest.raises(RuntimeError, match="one type"):
        kernel.rotary_write_kv(qk, v, cos, sin, cache.double(), cache.double(),
                               torch.tensor([0]), 1)


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 32000])
def test_argmax_rows_equals_torch_ties_infinities_and_nans_included(cols):
    torch.manual_seed(cols)
    wide = torch.randn(9, cols + 3)
    rows = wide[:, 1:1 + cols]  # a row stride wider than the row
    rows[1] = float("-inf")  # every value equal: the first
    rows[2, cols // 2:] = 50.0  # equal maxima: the first of them
    rows[3, -1] = float("inf")
    rows[4, cols // 3] = float("nan")  # a NaN counts above everything
    rows[5, cols - 1] = float("nan")
    rows[5, 0] = float("inf")
    rows[6] = float("nan")
    rows[7] = rows[7].round()  # many ties
    assert torch.equal(fused_ops_kernel().argmax_rows(rows), rows.argmax(-1))

