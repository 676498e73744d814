"""Sampling: seeded reproducibility, top-k=1 = greedy, stop strings, n, logprobs, penalties."""

import json
import math
import os
import shutil

import pytest

from strata import LLM, SamplingParams
from tests.conftest import STORIES, assert_all_blocks_free

PROMPT = "Once upon a time"
OTHERS = ["The dog", "Tom and Sue went to the park. They", "A big red ball"]


def _ids(outputs):
    return [s.token_ids for o in outputs for s in o.outputs]


def test_seeded_sampling_is_reproducible_across_runs_and_batches(stories_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=32, seed=1234)
    alone = _ids(stories_llm.generate(PROMPT, params, use_tqdm=False))
    again = _ids(stories_llm.generate(PROMPT, params, use_tqdm=False))
    unseeded = SamplingParams(temperature=1.0, max_tokens=40)
    mixed = stories_llm.generate(OTHERS + [PROMPT] + OTHERS,
                                 [unseeded] * 3 + [params] + [unseeded] * 3, use_tqdm=False)
    assert alone == again
    assert _ids([mixed[3]]) == alone
    other_seed = _ids(stories_llm.generate(PROMPT, SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=32, seed=4321), use_tqdm=False))
    assert other_seed != alone  # the seed matters


def test_top_k_one_equals_greedy(stories_llm):
    greedy = stories_llm.generate([PROMPT] + OTHERS, SamplingParams(temperature=0, max_tokens=30),
                                  use_tqdm=False)
    top1 = stories_llm.generate([PROMPT] + OTHERS, SamplingParams(
        temperature=1.3, top_k=1, max_tokens=30), use_tqdm=False)
    assert _ids(top1) == _ids(greedy)


def test_stop_string_cuts_exactly(stories_llm):
    full = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=48),
                                use_tqdm=False)[0].outputs[0].text
    # "Lily" spans tokens in stories260K; the text must end right before it.
    out = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=48,
                                                      stop=["Lily", "zzz"]),
                               use_tqdm=False)[0].outputs[0]
    assert out.text == full[:full.index("Lily")]
    assert (out.finish_reason, out.stop_reason) == ("stop", "Lily")
    kept = stories_llm.generate(PROMPT, SamplingParams(
        temperature=0, max_tokens=48, stop=["Lily"], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:full.index("Lily") + 4]
    assert_all_blocks_free(stories_llm)


def test_stop_token_ids_and_min_tokens(stories_llm):
    greedy = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20),
                                  use_tqdm=False)[0].outputs[0].token_ids
    stop_id = greedy[5]
    out = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20,
                                                      stop_token_ids=[stop_id]),
                               use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:greedy.index(stop_id) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    # min_tokens bans the stop tokens until enough tokens are out
    late = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, min_tokens=8,
                                                       stop_token_ids=[stop_id]),
                                use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 8 and stop_id not in late.token_ids[:7]


def test_eos_finishes_unless_ignored(stories_llm, tmp_path):
    # stories260K separates stories by BOS and never emits EOS: declare a token it does
    # emit as EOS in a copy of the checkpoint.
    greedy = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30),
                                  use_tqdm=False)[0].outputs[0].token_ids
    eos = greedy[9]
    for name in os.listdir(STORIES):
        shutil.copy(STORIES / name, tmp_path / name)
    config = json.loads((STORIES / "config.json").read_text()) | {"eos_token_id": eos}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").unlink()
    llm = LLM(str(tmp_path))
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:greedy.index(eos) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    ignored = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"


def test_n_samples_and_logprob_shapes(stories_llm):
    out = stories_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=10,
                                                      seed=7, logprobs=5),
                               use_tqdm=False)
    assert len(out) == 1 and [s.index for s in out[0].outputs] == [0, 1, 2]
    assert len({tuple(s.token_ids) for s in out[0].outputs}) > 1  # distinct samples
    for sample in out[0].outputs:
        assert len(sample.logprobs) == len(sample.token_ids) == 10
        for token, step in zip(sample.token_ids, sample.logprobs):
            assert token in step and 5 <= len(step) <= 6
            ranks = sorted(lp.rank for t, lp in step.items() if t != token or lp.rank <= 5)
            assert ranks[:5] == [1, 2, 3, 4, 5]
            assert all(lp.logprob <= 0 for lp in step.values())
    greedy = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                                  use_tqdm=False)[0].outputs[0]
    for token, step in zip(greedy.token_ids, greedy.logprobs):
        assert step[token].rank == 1 and len(step) == 2
        assert step[token].logprob == max(lp.logprob for lp in step.values())
        assert sum(math.exp(lp.logprob) for lp in step.values()) <= 1 + 1e-5


def test_penalties_change_output(stories_llm):
    base = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = _ids(stories_llm.generate(PROMPT, base, use_tqdm=False))[0]
    for extra in (dict(repetition_penalty=1.5), dict(frequency_penalty=1.5),
                  dict(presence_penalty=1.5)):
        penalised = _ids(stories_llm.generate(PROMPT, SamplingParams(
            temperature=0, max_tokens=60, ignore_eos=True, **extra), use_tqdm=False))[0]
        assert penalised != plain, extra
        # repeated tokens become rarer
        assert len(set(penalised)) >= len(set(plain)), extra


@pytest.mark.parametrize("min_p", [0.0, 0.3])
def test_top_p_min_p_restrict_to_likely_tokens(stories_llm, min_p):
    params = SamplingParams(temperature=1.0, top_p=0.05, min_p=min_p, max_tokens=20, seed=3,
                            logprobs=1)
    sample = stories_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    # top_p this small leaves only the most likely token each step
    assert all(step[t].rank == 1 for t, step in zip(sample.token_ids, sample.logprobs))
