"""Shared fixtures: the trained models in ../shared/models and tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K"
# transformers' greedy ids for each shared model (../shared/models/README.md)
GOLDEN = json.loads((SHARED_MODELS / "golden_greedy.json").read_text())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Small shapes that still exercise GQA, biases, q/k norm and rope scaling.
_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
ARCHITECTURES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def build_checkpoint(out: Path, arch: str, seed: int = 0, **config_overrides) -> Path:
    """A random-weight HF checkpoint (float32) with stories260K's tokenizer (vocab 512);
    config_overrides change its config (e.g. sliding_window=8)."""
    import transformers

    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**(_COMMON | extra | config_overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # sharper than the default init, so greedy ids are far from ties
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.15)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (STORIES / name).exists():
            shutil.copy(STORIES / name, out / name)
    return out


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints tensor parallelism is checked on: the four architectures, an odd
    one, and both shared models."""
    root = tmp_path_factory.mktemp("tp")
    overrides = {"mistral": {"sliding_window": 8}}
    cases = {arch: build_checkpoint(root / arch, arch, **overrides.get(arch, {}))
             for arch in ARCHITECTURES}
    # More ranks than KV heads (the one KV head replicated); a vocabulary of 509, which pads
    # the last rank's rows, tied, so they are the embedding's too; biases everywhere, those
    # of o_proj and down_proj added once.
    cases["one_kv_head"] = build_checkpoint(
        root / "one_kv_head", "llama3", num_key_value_heads=1, vocab_size=509,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    cases["stories260K"] = STORIES
    cases["TinyStories-656K"] = SHARED_MODELS / "TinyStories-656K"
    return cases


def transformers_greedy(path: Path, prompt: list[int], new_tokens: int, **config_overrides
                        ) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ids for a prompt (float32, CPU) and its last step's logits;
    config_overrides change the config it loads (e.g. sliding_window=None)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, **config_overrides).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), out.logits[-1][0]


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def tiny_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, build_checkpoint(tmp_path_factory.mktemp(arch), arch)


@pytest.fixture(scope="session")
def stories_llm():
    from strata import LLM

    return LLM(str(STORIES), max_num_seqs=64)


def _nixl_installed() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


# Both connectors where NIXL is installed (`make install` installs it); TCP alone otherwise.
CONNECTORS = ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not _nixl_installed(), reason="nixl is not installed"))]


def connector_class(kind: str):
    if kind == "nixl":
        from strata.engine.kv_connector.nixl import NixlKVConnector

        return NixlKVConnector
    from strata.engine.kv_connector.tcp import TcpKVConnector

    return TcpKVConnector


def assert_all_blocks_free(llm) -> None:
    """No request left and no block held: every block is free or only cached."""
    from tests.kv_invariants import check_kv_books

    engine = llm.engine
    assert not engine.has_unfinished_requests
    check_kv_books(engine.kv_cache_manager, [])
    assert engine.kv_cache_manager.usage == 0
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


def record_logits(llm) -> list[torch.Tensor]:
    """Make the engine keep every step's logits (rows that sample) in the returned list."""
    logits: list[torch.Tensor] = []
    model = llm.engine.runner.model
    original = model.compute_logits
    model.compute_logits = lambda hidden: logits.append(original(hidden)) or logits[-1]
    return logits


@pytest.fixture(scope="session")
def strata_server(tmp_path_factory):
    """One live `strata serve` of stories260K, shared by the server tests."""
    from tests.server_process import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("server"))
    yield server
    assert server.stop() == 0, server.log_text()
