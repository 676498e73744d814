"""The C++ layer loop of decode steps (csrc/decode_step.cpp) computes what the Python layers
compute, bit for bit: every step's logits equal, over prompts whose decodes share steps
with prompt chunks and run alone, for the model variants and kernels it covers; models it
does not cover run the Python layers."""

import pytest
import torch

import strata.engine.runner
import strata.model.llama
from strata import LLM, SamplingParams
from strata.model.cpu_kernels import decode_step_kernel
from strata.model.layers import cpu_linear_kernels
from tests.conftest import build_checkpoint, record_logits

pytestmark = pytest.mark.skipif(decode_step_kernel() is None,
                                reason="the C++ kernel could not be built here")

PROMPTS = [list(range(3, 3 + n)) for n in (5, 23, 9, 41)]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
CASES = {
    "llama3": ("llama3", {}, {}),  # grouped-query heads, llama3 rope scaling
    "mistral-window": ("mistral", {"sliding_window": 8}, {"block_size": 4}),
    "qwen2": ("qwen2", {}, {}),  # q/k/v biases, tied head
    "biases": ("llama3", {"attention_bias": True, "mlp_bias": True}, {}),
    "int8": ("llama3", {}, {"quantization": "int8"}),
    "int8-float16-kv": ("llama3", {}, {"quantization": "int8", "kv_cache_dtype": "float16"}),
    "bfloat16": ("qwen2", {}, {"dtype": "bfloat16"}),  # bfloat16 weights and KV
    "bfloat16-kv": ("mistral", {"sliding_window": 8}, {"kv_cache_dtype": "bfloat16"}),
}
# Every product on one of the other kernels: torch's own, oneDNN's in float32, and in
# bfloat16 where this CPU multiplies it.
OTHER_KERNEL_CASES = {"torch": ("llama3", {"attention_bias": True}, {}),
                "onednn": ("qwen2", {"attention_bias": True}, {}),
                "onednn-bf16": ("llama3", {"mlp_bias": True}, {"dtype": "bfloat16"})}
OTHER_KERNEL_CASES = {kernel: case for kernel, case in OTHER_KERNEL_CASES.items()
                if kernel in cpu_linear_kernels() + cpu_linear_kernels("bfloat16")}
PACKED = {None: "skinny", "int8": "int8", "bfloat16": "bf16"}


@pytest.fixture
def packed_everywhere(monkeypatch):
    """Every Linear on the packed C++ kernel of its format, whatever this machine's timing
    would choose for these tiny shapes."""
    _every_product_on(monkeypatch, lambda weight_format: PACKED[weight_format])


def _every_product_on(monkeypatch, kernel_of_format) -> None:
    def choose(linears, weight_format=None, cache_file=None):
        return {tuple(m.weight.shape): kernel_of_format(weight_format) for m in linears}

    monkeypatch.setattr(strata.engine.runner, "choose_cpu_linear_kernels", choose)


def _run(path, engine_args, monkeypatch, compiled: bool):
    """Every step's logits and the outputs, and how many steps took the C++ loop."""
    calls = []
    run = strata.model.llama.run_compiled
    with monkeypatch.context() as patch:
        patch.setattr(strata.model.llama, "run_compiled",
                      lambda *args: calls.append(1) or run(*args))
        if not compiled:
            patch.setattr(strata.model.llama, "compiled_decoder_layers", lambda model: None)
        llm = LLM(str(path), skip_tokenizer_init=True, max_num_batched_tokens=32, **engine_args)
        logits = record_logits(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS,
                               use_tqdm=False)
        llm.shutdown()
    return logits, [o.outputs[0].token_ids for o in outputs], len(calls)


@pytest.mark.parametrize("case", list(CASES) + list(OTHER_KERNEL_CASES))
def test_the_loop_gives_the_python_layers_logits_bit_for_bit(case, tmp_path, monkeypatch,
                                                             packed_everywhere):
    arch, config, engine_args = (CASES | OTHER_KERNEL_CASES)[case]
    if case in OTHER_KERNEL_CASES:
        _every_product_on(monkeypatch, lambda weight_format: case)
    path = build_checkpoint(tmp_path, arch, **config)
    compiled_logits, compiled_ids, compiled_steps = _run(path, engine_args, monkeypatch, True)
    python_logits, python_ids, python_steps = _run(path, engine_args, monkeypatch, False)
    # 32-token steps: the long prompts' chunks share steps with the short ones' decodes
    # (the Python layers), then decodes run alone (the loop).
    assert compiled_steps >= PARAMS.max_tokens - 2 and python_steps == 0
    assert compiled_ids == python_ids
    assert len(compiled_logits) == len(python_logits)
    for step, (ours, theirs) in enumerate(zip(compiled_logits, python_logits, strict=True)):
        assert torch.equal(ours, theirs), f"step {step}"


def test_models_and_kernels_it_does_not_cover_run_the_python_layers(tmp_path, monkeypatch,
                                                                    packed_everywhere):
    qwen3 = build_checkpoint(tmp_path / "qwen3", "qwen3")  # q and k normed per head
    llama = build_checkpoint(tmp_path / "llama", "llama3")
    choose = strata.engine.runner.choose_cpu_linear_kernels
    assert _run(qwen3, {}, monkeypatch, True)[2] == 0
    # one product on torch's int8 kernel
    monkeypatch.setattr(strata.engine.runner, "choose_cpu_linear_kernels",
                        lambda linears, *args, **kwargs: {
                            **choose(linears, "int8"),
                            tuple(linears[0].weight.shape): "int8-torch"})
    assert _run(llama, {"quantization": "int8"}, monkeypatch, True)[2] == 0
