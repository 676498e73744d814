"""From a checkpoint to a loaded model: architecture lookup, dtype, device, weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from strata.checkpoint import load_json
from strata.model.llama import LlamaForCausalLM, ModelArgs
from strata.model.loader import PlacementTimes, iterate_weights
from strata.model.parallel import SINGLE, TensorParallel
from strata.model.safetensors_stream import WeightStream

# config.json "architectures" -> model class. Qwen3 differs from Llama only by
# q/k norm, and Mistral by its sliding window: flags of one class.
ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The device of a process that is `local_rank` among the ranks of its machine: on CUDA,
    one GPU per rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def resolve_dtype(dtype: str, device: torch.device, config: dict) -> torch.dtype:
    """float32 on CPU; on CUDA the checkpoint's half type, else bfloat16."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    stored = config.get("dtype") or config.get("torch_dtype")
    return torch.float16 if stored == "float16" else torch.bfloat16


def model_args(config: dict) -> tuple[str, ModelArgs]:
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in ARCHITECTURES]
    if not supported:
        raise ValueError(f"unsupported architecture {architectures or 'none given'} "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return supported[0], ModelArgs.from_hf(config, supported[0])


def build_model(path: Path, dtype: torch.dtype, device: torch.device,
                tp: TensorParallel = SINGLE) -> LlamaForCausalLM:
    """The model, or this rank's shard of it under tensor parallelism, its weights not yet
    loaded (allocated, not initialised)."""
    architecture, args = model_args(load_json(path / "config.json"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ARCHITECTURES[architecture](args, tp)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def load_weights(model: LlamaForCausalLM, stream: WeightStream,
                 times: PlacementTimes | None = None,
                 on_complete: Callable[[str], None] = lambda name: None) -> None:
    """Place the streamed checkpoint's tensors in the model as they arrive; `on_complete`
    as LlamaForCausalLM.load_weights."""
    with torch.no_grad():
        model.load_weights(iterate_weights(stream, times), on_complete)
