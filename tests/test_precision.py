"""Lower precisions, each against transformers in the same arithmetic: int8 weights
(--quantization int8) and bfloat16 weights (--dtype bfloat16 on CPU) against transformers
over the same weights in float32; 16-bit KV caches (--kv-cache-dtype) within their
documented tolerances (docs/serving.md, "Precision")."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import strata.engine.runner
from strata import LLM, SamplingParams
from strata.model.layers import Linear, cpu_linear_kernels, quantize_int8
from tests.conftest import build_checkpoint, record_logits, transformers_greedy

PROMPTS = [[1, 5, 77, 300, 12, 9], [1] + list(range(20, 60))]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    values, scales = quantize_int8(weight)
    return values.float() * scales.unsqueeze(1)


def _bfloat16(weight: torch.Tensor) -> torch.Tensor:
    return weight.to(torch.bfloat16).float()


# The float32 weights transformers is given to compute what each narrow format computes.
STORED = {"int8": _dequantized, "bfloat16": _bfloat16}


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _onednn_bf16(x, weight, bias):
    """oneDNN's bfloat16 product: input and weight rounded, sums in float32, the output
    rounded to bfloat16 before the (float32) bias."""
    out = _rounded(F.linear(_rounded(x), _rounded(weight)))
    return out if bias is None else out + bias


# What each kernel's product must equal, from the float32 rows, weight and bias.
EXPECTED = {"int8": lambda x, w, b: F.linear(x, _dequantized(w), b),
            "bf16": lambda x, w, b: F.linear(x, _bfloat16(w), b),
            "onednn-bf16": _onednn_bf16}
EXPECTED |= {"int8-torch": EXPECTED["int8"], "bf16-torch": EXPECTED["bf16"]}


@pytest.mark.parametrize("kernel", cpu_linear_kernels("int8") + cpu_linear_kernels("bfloat16"))
@pytest.mark.parametrize("rows", [1, 5, 8, 13, 17])  # one tile, two, and past a tile: widened
@pytest.mark.parametrize("bias", [False, True])
def test_narrow_kernels_compute_their_formats_product(kernel, rows, bias):
    torch.manual_seed(rows)
    layer = Linear(48, 37, bias=bias)  # 37 outputs: a last panel of 5
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 48)
    expected = EXPECTED[kernel](x, layer.weight.detach(), layer.bias)
    layer.pack(kernel)
    # A sum in another order may round to the neighbouring bfloat16: one step of 2^-8.
    tolerance = 2 ** -8 if kernel == "onednn-bf16" else 1e-5
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=tolerance)


def test_int8_quantization_is_within_half_a_step_per_channel():
    weight = torch.randn(64, 96) * torch.logspace(-3, 1, 64).unsqueeze(1)
    weight[3] = 0  # an all-zero row: a finite scale, zeros back
    values, scales = quantize_int8(weight)
    assert values.dtype == torch.int8 and values.abs().max() == 127
    assert torch.isfinite(scales).all() and scales.shape == (64,)
    error = (values.float() * scales.unsqueeze(1) - weight).abs()
    assert (error <= scales.unsqueeze(1) / 2 * (1 + 1e-5)).all()
    assert (values[3] == 0).all()


def _stored_copy(path, out, stored):
    """The checkpoint with every linear weight Strata stores narrower replaced by the
    float32 values it stores: the same arithmetic in transformers, in float32."""
    out.mkdir()
    for item in path.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out / item.name)
    tensors = load_file(path / "model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            tensors[name] = stored(tensor)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _every_product_on(monkeypatch, kernel: str) -> None:
    """Every packable product on `kernel`, whatever this machine's timing would choose."""
    monkeypatch.setattr(strata.engine.runner, "choose_cpu_linear_kernels",
                        lambda linears, *args, **kwargs: {tuple(m.weight.shape): kernel
                                                          for m in linears})


FORMATS = {"int8": dict(quantization="int8"),
           # a float32 KV cache: the weights' rounding is the only difference
           "bfloat16": dict(dtype="bfloat16", kv_cache_dtype="float32")}


@pytest.mark.parametrize("weight_format", list(FORMATS))
@pytest.mark.parametrize("arch", ["llama3", "qwen2"])  # untied head; tied head and biases
def test_narrow_weights_match_transformers_over_the_same_weights(tmp_path, arch, weight_format,
                                                               monkeypatch):
    if weight_format == "bfloat16":  # the kernel that keeps the activations in float32
        _every_product_on(monkeypatch, cpu_linear_kernels("bfloat16")[0])
    path = build_checkpoint(tmp_path / arch, arch)
    reference = _stored_copy(path, tmp_path / f"{arch}-stored", STORED[weight_format])
    llm = LLM(str(path), skip_tokenizer_init=True, **FORMATS[weight_format])
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert {m.kernel for m in linears} <= set(cpu_linear_kernels(weight_format)) | {"torch"}
    assert sum(m.kernel != "torch" for m in linears) >= 4 * 2  # qkv, o, gate_up, down
    logits = record_logits(llm)
    for prompt in PROMPTS:
        logits.clear()
        expected_ids, expected_last = transformers_greedy(reference, prompt, NEW_TOKENS)
        out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected_ids
        torch.testing.assert_close(logits[-1][0], expected_last, atol=1e-4, rtol=0)


# Documented tolerances of a 16-bit KV cache under a float32 model, on the last step's
# logits against transformers in float32 (the K/V rounding is the only difference).
KV_TOLERANCE = {"float16": 5e-3, "bfloat16": 5e-2}


@pytest.mark.parametrize("kv_dtype", list(KV_TOLERANCE))
def test_16_bit_kv_cache_within_its_tolerance(tmp_path, kv_dtype):
    path = build_checkpoint(tmp_path / "llama3", "llama3")
    llm = LLM(str(path), kv_cache_dtype=kv_dtype, skip_tokenizer_init=True)
    assert llm.engine.runner.kv_caches.dtype == getattr(torch, kv_dtype)
    logits = record_logits(llm)
    for prompt in PROMPTS:
        logits.clear()
        _, expected_last = transformers_greedy(path, prompt, NEW_TOKENS)
        llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
        error = (logits[-1][0] - expected_last).abs().max().item()
        assert 0 < error <= KV_TOLERANCE[kv_dtype]  # rounded, but within the bound


@pytest.mark.parametrize("kernel", cpu_linear_kernels("bfloat16"))
def test_bfloat16_on_cpu_is_bfloat16_weights_and_kv_within_bfloat16s_tolerance(
        tmp_path, kernel, monkeypatch):
    import transformers

    _every_product_on(monkeypatch, kernel)
    path = build_checkpoint(tmp_path / "llama3", "llama3")
    llm = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True)
    runner = llm.engine.runner
    assert runner.dtype == torch.float32 and runner.kv_caches.dtype == torch.bfloat16
    packed = [m.packed for m in runner.model.modules() if isinstance(m, Linear)
              and m.kernel == kernel]
    assert len(packed) >= 4 * 2 and all(p.dtype == torch.bfloat16 for p in packed)
    logits = record_logits(llm)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for prompt in PROMPTS:
        logits.clear()
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
        with torch.inference_mode():
            expected = model(torch.tensor([prompt])).logits[0, -1].float()
        ours = logits[-1][0].float()
        # bfloat16 keeps 8 bits of mantissa: a relative error of 2^-8 per rounding.
        assert (ours - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="int4"), "unknown quantization"),
    (dict(kv_cache_dtype="fp8"), "unknown kv_cache_dtype"),
    (dict(quantization="int8", dtype="bfloat16"), "float32 activations"),
])
def test_unsupported_precisions_are_refused(kwargs, message):
    from tests.conftest import STORIES

    with pytest.raises(ValueError, match=message):
        LLM(str(STORIES), skip_tokenizer_init=True, **kwargs)
