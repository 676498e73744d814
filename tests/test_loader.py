"""Checkpoint loading: sharded files, tied embeddings, and one-line errors."""

import json
import shutil

import pytest
import torch
import transformers

from strata import LLM, SamplingParams
from strata.cli import main
from tests.conftest import STORIES, build_checkpoint


def _greedy(path, **kwargs):
    llm = LLM(str(path), **kwargs)
    return llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = build_checkpoint(tmp_path / "single", "llama3")
    model = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(single / name, tmp_path / "sharded" / name)
    assert _greedy(tmp_path / "sharded") == _greedy(single)


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
    shutil.copytree(STORIES, tmp_path / "m")
    config = json.loads((STORIES / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPTNeoXForCausalLM") as err:
        LLM(str(tmp_path / "m"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tmp_path, missing):
    shutil.copytree(STORIES, tmp_path / "m")
    (tmp_path / "m" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace("model.", r"\*?\.?")):
        LLM(str(tmp_path / "m"))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(STORIES, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.gate_up_proj"):
        LLM(str(tmp_path / "m"))


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot resolve model 'nobody/no-such-model'"):
        LLM("nobody/no-such-model")


def test_cli_generate(capsys):
    assert main(["generate", "--model", str(STORIES), "--prompt", "Once upon a time",
                 "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time, there was a little girl named Lily.")


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["generate", "--model", str(STORIES), "--prompt", "x", "--top-p", "3"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_each_weight_is_packed_as_it_lands_and_a_late_copy_of_it_is_refused():
    """on_complete names a parameter as soon as its last part is in (a fused qkv after its
    q, k and v), before the checkpoint's next tensor; a packed weight's tensor arriving
    again is an error, not a copy into a weight nobody reads."""
    from safetensors import safe_open

    from strata.model.layers import weight_packer
    from strata.model.registry import build_model

    with safe_open(STORIES / "model.safetensors", "pt") as checkpoint:
        tensors = [(name, checkpoint.get_slice(name)) for name in checkpoint.keys()]  # noqa: SIM118
    model = build_model(STORIES, torch.float32, torch.device("cpu"))
    linears = {n for n, m in model.named_modules() if getattr(m, "packed", 0) is None}
    arrived: list[str] = []
    complete_at: dict[str, int] = {}  # how many tensors had arrived then

    def stream():
        for name, tensor in tensors:
            arrived.append(name)
            yield name, tensor

    kernels = {tuple(model.get_submodule(n).weight.shape): "skinny" for n in linears}
    pack = weight_packer(model, kernels)
    model.load_weights(stream(), lambda name: (complete_at.setdefault(name, len(arrived)),
                                               pack(name)))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    last_part = max(i for i, (name, _) in enumerate(tensors, 1)
                    if name.startswith("model.layers.0.self_attn.") and
                    name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"))
    assert complete_at[qkv] == last_part
    assert all(model.get_submodule(n).packed is not None for n in linears
               if n != "lm_head" or not model.args.tie_word_embeddings)
    again = next((name, t) for name, t in tensors if name.endswith("o_proj.weight"))
    model = build_model(STORIES, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="o_proj.weight' came again after its weight was"):
        model.load_weights(iter([*tensors, again]), weight_packer(model, kernels))
