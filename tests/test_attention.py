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
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 32), (8, 2, 16), (4, 1, 64)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("lens", [[1], [17, 3, 64, 100, 33]])
def test_kernel_matches_reference(monkeypatch, heads, kv_heads, head_dim, window, lens):
    torch.manual_seed(0)
    num_blocks, block_size = 64, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
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
