"""The small-batch products of Linear (C++ kernel, weight-on-the-left mm) equal F.linear."""

import pytest
import torch
import torch.nn.functional as F

from strata.model import layers
from strata.model.cpu_kernels import skinny_linear_kernel
from strata.model.layers import Linear


def _linear(in_features: int, out_features: int, bias: bool) -> Linear:
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.skipif(skinny_linear_kernel() is None, reason="the C++ kernel could not be built")
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 13, 64])
@pytest.mark.parametrize("in_features, out_features", [(256, 700), (37, 5), (688, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_f_linear(rows, in_features, out_features, bias):
    torch.manual_seed(rows)
    layer = _linear(in_features, out_features, bias)
    x = torch.randn(rows, in_features)
    got = skinny_linear_kernel().skinny_linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 65, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_every_path_of_linear_matches_f_linear(monkeypatch, rows, bias):
    monkeypatch.setattr(layers, "KERNEL_ROWS", 0)  # 1-128 rows: the weight-on-the-left mm
    torch.manual_seed(rows)
    layer = _linear(96, 300, bias)
    x = torch.randn(rows, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # A 3-d input (tokens not flattened) keeps the plain path.
    torch.testing.assert_close(layer(x.unsqueeze(0)), expected.unsqueeze(0))
