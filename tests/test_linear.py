"""Linear's packed CPU kernel equals F.linear, for decode-sized and prompt-sized inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strata.model.cpu_kernels import skinny_linear_kernel
from strata.model.layers import (
    Embedding,
    Linear,
    cpu_linear_kernel_pays,
    pack_linears,
    packable_linears,
)

kernel_required = pytest.mark.skipif(skinny_linear_kernel() is None,
                                     reason="the C++ kernel could not be built here")


def _linear(in_features: int, out_features: int, bias: bool) -> Linear:
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@kernel_required
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 13, 64, 300])
@pytest.mark.parametrize("in_features, out_features", [(256, 704), (37, 5), (688, 250)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, in_features, out_features, bias):
    torch.manual_seed(rows)
    layer = _linear(in_features, out_features, bias)
    x = torch.randn(rows, in_features)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack(skinny_linear_kernel())
    assert layer.weight is None and layer.packed.shape == (-(-out_features // 16),
                                                           in_features, 16)
    got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x.view(1, rows, in_features)), expected.unsqueeze(0),
                               rtol=1e-5, atol=1e-4)


@kernel_required
def test_weights_shared_with_an_embedding_are_not_packed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embedding(50, 32)
            self.head = Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight
            self.proj = Linear(32, 32, bias=False)

    model = Tied()
    pack_linears(packable_linears(model))  # packed whatever this CPU measures
    assert model.head.packed is None and model.head.weight is model.embed.weight
    assert model.proj.packed is not None and model.proj.weight is None


@kernel_required
def test_the_kernel_is_used_only_where_it_beats_torch(monkeypatch, caplog):
    """Calibration: the kernel is used if it is faster than torch's product for one row on
    this CPU, and otherwise not, saying so."""
    from strata.model import layers

    for packed_s, torch_s, packs in ((1e-6, 2e-6, True), (5e-6, 1e-6, False)):
        monkeypatch.setattr(layers, "kernel_vs_torch_seconds", lambda *_, p=packed_s,
                            t=torch_s: (p, t))
        model = nn.Sequential(Linear(32, 64, bias=False))
        with caplog.at_level("WARNING", logger="strata.model.layers"):
            assert cpu_linear_kernel_pays(packable_linears(model)) is packs
        assert ("5.0x slower" in caplog.text) is not packs
    packed_s, torch_s = layers.kernel_vs_torch_seconds(layers.skinny_linear_kernel(),
                                                       torch.randn(64, 32))
    assert 0 < packed_s < 1 and 0 < torch_s < 1
