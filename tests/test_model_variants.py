"""Model features the plain parity checkpoints leave out: Mistral's sliding window shorter
than the prompt (through every KV-cache path that could hide it), and rope scaling types."""

import json

import pytest

import strata.model.attention
from strata import LLM, SamplingParams
from tests.conftest import build_checkpoint, transformers_greedy

WINDOW = 8
# Longer than the window many times over; the second shares the first's first 32 tokens, so
# a batch of both reads cached prefix blocks.
PROMPTS = [[1] + list(range(20, 59)), [1] + list(range(20, 51)) + [7, 300, 41]]
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _strata_greedy(path, prompts, **engine_args) -> list[list[int]]:
    llm = LLM(str(path), skip_tokenizer_init=True, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


@pytest.fixture(scope="module")
def mistral_window(tmp_path_factory):
    """A Mistral checkpoint with a window of 8, and transformers' greedy ids for PROMPTS."""
    path = build_checkpoint(tmp_path_factory.mktemp("mistral-window"), "mistral",
                            sliding_window=WINDOW)
    assert json.loads((path / "config.json").read_text())["sliding_window"] == WINDOW
    return path, [transformers_greedy(path, p, NEW_TOKENS)[0] for p in PROMPTS]


@pytest.fixture(params=["cpu-kernel", "torch"])
def decode_attention(request, monkeypatch):
    """Decodes attend in the C++ kernel (where it builds) or in the PyTorch reference path
    (what STRATA_ATTENTION=torch selects, without reloading the kernel afterwards)."""
    if request.param == "torch":
        monkeypatch.setattr(strata.model.attention, "paged_decode_kernel", lambda: None)
    return request.param


def test_the_window_changes_transformers_output(mistral_window):
    """Otherwise the parity test below could pass with the window ignored."""
    path, expected = mistral_window
    assert all(len(p) > 4 * WINDOW for p in PROMPTS)
    for prompt, ids in zip(PROMPTS, expected, strict=True):
        assert transformers_greedy(path, prompt, NEW_TOKENS, sliding_window=None)[0] != ids


@pytest.mark.parametrize("engine_args", [
    {},  # blocks of 16: the window is a part of one block
    {"block_size": 4},  # the window spans blocks, and whole blocks fall out of it
    {"block_size": 4, "max_num_batched_tokens": 12},  # prompt chunks attend to earlier chunks
    {"block_size": 4, "enable_prefix_caching": False},
], ids=["bs16", "bs4", "bs4-chunked", "bs4-no-prefix-cache"])
def test_sliding_window_shorter_than_the_prompt_matches_transformers(
        mistral_window, decode_attention, engine_args):
    path, expected = mistral_window
    assert _strata_greedy(path, PROMPTS, **engine_args) == expected


def test_sliding_window_after_a_prefix_cache_hit(mistral_window):
    """The second time, the prompt's first blocks come from the prefix cache."""
    path, expected = mistral_window
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4)
    first = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": PROMPTS[1]}, GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected


LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def test_linear_rope_scaling_matches_transformers(tmp_path):
    path = build_checkpoint(tmp_path / "linear", "llama3", rope_parameters=LINEAR)
    prompt = PROMPTS[0]
    expected = transformers_greedy(path, prompt, NEW_TOKENS)[0]
    unscaled = {"rope_type": "default", "rope_theta": 10000.0}
    assert transformers_greedy(path, prompt, NEW_TOKENS, rope_parameters=unscaled)[0] != expected
    assert _strata_greedy(path, [prompt]) == [expected]
    # The older layout (transformers 4): rope_theta beside rope_scaling {"type": ...}.
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    config |= {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (path / "config.json").write_text(json.dumps(config))
    assert _strata_greedy(path, [prompt]) == [expected]


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "longrope", "factor": 2.0},
], ids=["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_is_refused_at_load(tmp_path, rope):
    path = build_checkpoint(tmp_path / "m", "llama3")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = rope | {"rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ValueError, match=rf"unsupported rope_type '{name}'.*default, linear, llama3"
                       ) as err:
        LLM(str(path), skip_tokenizer_init=True)
    assert "\n" not in str(err.value)
