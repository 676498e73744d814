"""Linear's packed CPU kernels (oneDNN's, the C++ one) equal F.linear, for decode-sized and
prompt-sized inputs, and the fastest is chosen per weight shape."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strata.model.cpu_kernels import skinny_linear_kernel
from strata.model.layers import (
    Embedding,
    Linear,
    choose_cpu_linear_kernels,
    packable_linears,
    weight_packer,
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


@pytest.mark.parametrize("kernel", [
    "onednn", pytest.param("skinny", marks=kernel_required)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 13, 64, 300])
@pytest.mark.parametrize("in_features, out_features", [(256, 704), (37, 5), (688, 250)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(kernel, rows, in_features, out_features, bias):
    torch.manual_seed(rows)
    layer = _linear(in_features, out_features, bias)
    x = torch.randn(rows, in_features)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack(kernel)
    assert layer.weight is None and layer.kernel == kernel
    got = layer(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x.view(1, rows, in_features)), expected.unsqueeze(0),
                               rtol=1e-5, atol=1e-4)


def test_weights_shared_with_an_embedding_are_not_packed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embedding(50, 32)
            self.head = Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight
            self.proj = Linear(32, 32, bias=False)

    model = Tied()
    assert packable_linears(model) == [model.proj]
    pack = weight_packer(model, {(32, 32): "onednn", (50, 32): "onednn"})
    for name in ("embed.weight", "head.weight", "proj.weight"):
        pack(name)
    assert model.head.packed is None and model.head.weight is model.embed.weight
    assert model.proj.packed is not None and model.proj.weight is None


def test_the_fastest_kernel_is_chosen_per_weight_shape(monkeypatch, caplog):
    """Calibration: per weight shape, the kernel least slower than the fastest over the
    decode batches, said in one log line; the real slowdowns are at least 1 and the
    fastest's at most 2 (each batch size's fastest counts 1)."""
    from strata.model import layers

    timings = {(64, 32): {"torch": 3.0, "onednn": 1.0},  # onednn 3x faster
               (32, 32): {"torch": 1.0, "onednn": 2.0}}
    monkeypatch.setattr(layers, "kernel_slowdowns",
                        lambda weight, kernels: timings[tuple(weight.shape)])
    model = nn.Sequential(Linear(32, 64, bias=False), Linear(32, 32, bias=False))
    with caplog.at_level("INFO", logger="strata.model.layers"):
        choice = choose_cpu_linear_kernels(packable_linears(model))
    assert choice == {(32, 32): "torch", (64, 32): "onednn"}
    assert "32x32 torch (1.0x torch's), 64x32 onednn (3.0x torch's)" in caplog.text
    monkeypatch.undo()
    slowdowns = layers.kernel_slowdowns(torch.randn(64, 32), layers.cpu_linear_kernels())
    assert set(slowdowns) >= {"torch", "onednn"}
    assert all(s >= 1 for s in slowdowns.values()) and min(slowdowns.values()) < 2


def test_strata_linear_torch_keeps_every_weight_for_f_linear(monkeypatch):
    monkeypatch.setenv("STRATA_LINEAR", "torch")
    model = nn.Sequential(Linear(32, 64, bias=False))
    assert choose_cpu_linear_kernels(packable_linears(model)) == {}


def test_kernel_choices_are_cached_per_machine(monkeypatch, tmp_path):
    """A shape timed once on this machine is not timed again, nor the file rewritten;
    another thread count is another machine; a cache that cannot be written costs nothing
    but the next timing."""
    import json

    from strata.model import layers

    cache = tmp_path / "strata" / "linear-kernels.json"
    model = nn.Sequential(Linear(32, 64, bias=False))
    first = choose_cpu_linear_kernels(packable_linears(model), cache_file=cache)

    def timed_again(weight, kernels):
        raise AssertionError("timed again")

    monkeypatch.setattr(layers, "kernel_slowdowns", timed_again)
    written = cache.stat().st_ino  # a rewrite replaces the file: a new inode
    assert choose_cpu_linear_kernels(packable_linears(model), cache_file=cache) == first
    assert cache.stat().st_ino == written
    monkeypatch.setattr(layers, "kernel_slowdowns",
                        lambda weight, kernels: {k: 1.0 + i for i, k in enumerate(kernels)})
    wider = nn.Sequential(Linear(32, 48, bias=False))
    assert choose_cpu_linear_kernels(packable_linears(wider), cache_file=cache) == \
        {(48, 32): "torch"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert choose_cpu_linear_kernels(packable_linears(model), cache_file=cache) == \
            {(64, 32): "torch"}
    finally:
        torch.set_num_threads(threads)
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and {"64x32", "48x32"} <= set(next(iter(entries.values())))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert choose_cpu_linear_kernels(packable_linears(model),
                                     cache_file=blocked / "linear-kernels.json") == \
        {(64, 32): "torch"}
