"""Tensor parallelism at N = 2, run SPMD: two spawned ranks (gloo over a file:// rendezvous)
each run the same offline engine over the same requests; the scheduler is deterministic and
every rank gathers the whole logits, so both sample what N = 1 samples."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from strata import LLM, SamplingParams
from strata.model.layers import Linear
from strata.model.parallel import TensorParallel
from strata.model.registry import load_model
from tests.conftest import ARCHITECTURES, STORIES, build_checkpoint, record_logits

PROMPTS = [[1, 5, 77, 300, 12, 9], [1] + list(range(20, 60)), [1, 400]]
NEW_TOKENS = 16
BUDGET = "1MiB"  # the same per-rank KV memory at N = 1 and N = 2
RANK_TIMEOUT = 120  # seconds: a rank that hangs fails the test instead of stalling it


def _run(path: Path, **engine_args) -> dict:
    """Greedy ids, the last step's logits, weight bytes and KV blocks of one engine."""
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory=BUDGET, **engine_args)
    logits = record_logits(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    model = llm.engine.runner.model
    weight_bytes = sum(p.nbytes for p in model.parameters()) + sum(
        m.packed.nbytes for m in model.modules() if isinstance(m, Linear) and m.packed is not None)
    return {"ids": [o.outputs[0].token_ids for o in outputs], "logits": logits[-1],
            "weight_bytes": weight_bytes, "num_blocks": llm.engine.runner.num_blocks}


def _rank(rank: int, init_file: str, cases: dict[str, Path], out: Path) -> None:
    import torch.distributed as dist

    from strata.model.parallel import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, 2, f"file://{init_file}", torch.device("cpu"), timeout=30)
    results = {name: _run(path, tensor_parallel_size=2) for name, path in cases.items()}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
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
    return cases


@pytest.mark.timeout(RANK_TIMEOUT + 60)
def test_two_ranks_match_one(cases, tmp_path):
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(r, str(tmp_path / "init"), cases, tmp_path))
             for r in range(2)]
    for process in ranks:
        process.start()
    single = {name: _run(path) for name, path in cases.items()}  # meanwhile, N = 1 here
    for process in ranks:
        process.join(RANK_TIMEOUT)
        if process.is_alive():
            process.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, one in single.items():
        for two in per_rank:
            assert two[name]["ids"] == one["ids"], name
            assert torch.allclose(two[name]["logits"], one["logits"], atol=1e-4, rtol=0), name
            if name != "one_kv_head":  # its k/v rows are whole on both ranks
                assert 0.45 < two[name]["weight_bytes"] / one["weight_bytes"] < 0.55, name
                assert abs(two[name]["num_blocks"] - 2 * one["num_blocks"]) <= 1, name


def test_a_model_that_does_not_divide_is_refused(cases):
    # 4 query heads, 2 KV heads, intermediate 96: not by 3.
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .*\(4\).*\(96\).*\(2\)") as err:
        load_model(cases["llama3"], torch.float32, torch.device("cpu"), TensorParallel(0, 3))
    assert "\n" not in str(err.value)


def test_more_ranks_than_the_process_group_is_refused(cases):
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs torch.distributed"):
        LLM(str(cases["llama3"]), skip_tokenizer_init=True, tensor_parallel_size=2)
