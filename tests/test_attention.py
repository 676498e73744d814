"""The C++ decode kernel equals the PyTorch reference path; engine outputs agree across both."""

import pytest
import torch

from strata import LLM, SamplingParams
from strata.model import attention
from strata.model.attention import AttentionGroup, AttentionMetadata, paged_attention
from strata.model.cpu_kernels import paged_decode_kernel
from tests.conftest import STORIES

kernel_required = pytest.mark.skipif(paged_decode_kernel() is None,
                                     reason="the C++ kernel could not be built here")


def _decode_group(context_lens: list[int], block_size: int, num_blocks: int) -> AttentionGroup:
    batch = len(context_lens)
    max_blocks = -(-max(context_lens) // block_size)
    tables = torch.randperm(num_blocks)[:batch * max_blocks].view(batch, max_blocks)
    lens = torch.tensor(context_lens)
    return AttentionGroup(
        token_index=torch.arange(batch).unsqueeze(1), query_positions=(lens - 1).unsqueeze(1),
        block_tables=tables.contiguous(), context_lens=lens,
        padded_rows=torch.arange(batch), flat_tokens=torch.arange(batch))


@kernel_required
# Heads of their own KV head take the kernel's per-head loop at every vector count (16 to
# 128 values); grouped heads its grouped loop.
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 32), (4, 4, 16), (4, 4, 64),
                                                       (2, 2, 128), (8, 2, 16), (4, 1, 64)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("lens", [[1], [17, 3, 64, 100, 33]])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(monkeypatch, heads, kv_heads, head_dim, window, lens,
                                  cache_dtype):
    """Either cache type: the kernel widens what it reads as the reference path does."""
    torch.manual_seed(0)
    num_blocks, block_size = 64, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    q = torch.randn(len(lens), heads, head_dim)
    meta = AttentionMetadata(torch.empty(0), [_decode_group(lens, block_size, num_blocks)])
    fast = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, window)
    monkeypatch.setattr(attention, "_decode_kernel", lambda q: None)
    reference = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, window)
    torch.testing.assert_close(fast, reference, atol=2e-6, rtol=1e-5)


@kernel_required
def test_engine_outputs_agree_with_reference_path(monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    prompts = ["Once upon a time", "Tom and Sue went to the park. They", "A big dog"]
    fast = LLM(str(STORIES)).generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(attention, "_decode_kernel", lambda q: None)
    reference = LLM(str(STORIES)).generate(prompts, params, use_tqdm=False)
    for a, b in zip(fast, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert step_a[token].logprob == pytest.approx(step_b[token].logprob, abs=1e-4)


@kernel_required
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 32), (8, 2, 16)])
def test_shared_prefixes_attended_once_match_reference(monkeypatch, heads, kv_heads, head_dim):
    """Rows 0-2 share 5 blocks, rows 3-4 share 3 of theirs, row 5 shares nothing: the
    cascade (shared part as one product, merged by log-sum-exp) equals full attention."""
    from strata.engine import runner

    monkeypatch.setattr(runner, "MIN_SHARED_TOKENS_SAVED", 1)
    torch.manual_seed(1)
    num_blocks, block_size = 64, 4
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    ids = iter(torch.randperm(num_blocks).tolist())
    shared_a, shared_b = [next(ids) for _ in range(5)], [next(ids) for _ in range(3)]
    lens = [23, 21, 30, 14, 17, 9]
    prefixes = [shared_a] * 3 + [shared_b] * 2 + [[]]
    width = -(-max(lens) // block_size)
    rows = []
    for prefix, length in zip(prefixes, lens):
        own = [next(ids) for _ in range(-(-length // block_size) - len(prefix))]
        rows.append(prefix + own + [0] * (width - len(prefix) - len(own)))
    tables = torch.tensor(rows)
    group = AttentionGroup(
        token_index=torch.arange(6).unsqueeze(1), query_positions=(torch.tensor(lens) - 1)
        .unsqueeze(1), block_tables=tables, context_lens=torch.tensor(lens),
        padded_rows=torch.arange(6), flat_tokens=torch.arange(6))
    starts = torch.zeros(6, dtype=torch.int64)
    for members, shared in runner._shared_prefixes(tables.numpy(), group.context_lens.numpy(),
                                                   block_size):
        group.shared_prefixes.append(attention.SharedPrefix(
            torch.from_numpy(members), tables[members[0], :shared]))
        starts[members] = shared * block_size
    group.context_starts = starts
    assert sorted(p.rows.tolist() for p in group.shared_prefixes) == [[0, 1, 2], [3, 4]]
    assert starts.tolist() == [20, 20, 20, 12, 12, 0]
    q = torch.randn(6, heads, head_dim)
    meta = AttentionMetadata(torch.empty(0), [group])
    fast = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    monkeypatch.setattr(attention, "_decode_kernel", lambda q: None)
    reference = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, None)
    torch.testing.assert_close(fast, reference, atol=2e-6, rtol=1e-5)
