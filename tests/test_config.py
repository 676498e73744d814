"""--kv-cache-memory: the sizes it reads, the ones it refuses, and that the pool follows it."""

import json

import pytest

from strata import LLM
from strata.cli import main
from strata.config import CacheConfig, EngineConfig, parse_size
from tests.conftest import STORIES


@pytest.mark.parametrize("text, size", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("64KiB", 64 * 1024), ("1.5GB", 1_500_000_000),
    ("3gb", 3_000_000_000), ("2e9", 2_000_000_000), ("1048576", 1048576), (" 4 GiB ", 4 * 2**30),
    ("100B", 100), ("1k", 1000), ("0.5MiB", 2**19)])
def test_memory_sizes_in_binary_and_decimal_units(text, size):
    assert parse_size(text) == size
    assert CacheConfig(kv_cache_memory=text).kv_cache_memory == size
    assert EngineConfig.create(kv_cache_memory=text).cache.kv_cache_memory == size


def test_plain_numbers_are_bytes():
    assert CacheConfig(kv_cache_memory=123456).kv_cache_memory == 123456
    assert CacheConfig(kv_cache_memory=2e9).kv_cache_memory == 2_000_000_000
    assert CacheConfig().kv_cache_memory is None  # the default: a fraction of free memory


@pytest.mark.parametrize("value", ["lots", "-1", "1TB?", "GiB", "1..5GB", "e", "1e", "4 GiBs",
                                   "nan", ""])
def test_unreadable_sizes_are_refused_with_an_example(value):
    with pytest.raises(ValueError, match=r"cannot read a memory size from .*'512MiB'") as err:
        CacheConfig(kv_cache_memory=value)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("value", ["0", 0, -1, "0.1", 0.5, "1e999", float("inf")])
def test_sizes_below_one_byte_or_infinite_are_refused(value):
    """0 in particular: the runner reads a budget of 0 as "no budget given"."""
    with pytest.raises(ValueError, match="at least 1"):
        CacheConfig(kv_cache_memory=value)


def test_cli_reports_a_bad_size_in_one_line(capsys):
    assert main(["generate", "--model", str(STORIES), "--prompt", "x",
                 "--kv-cache-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata: error: cannot read a memory size from 'lots'")
    assert err.count("\n") == 1


def test_the_kv_pool_is_sized_from_the_budget():
    """stories260K needs 512 tokens of KV (its context); a budget a little short of that
    is refused, naming the tokens it would hold, and the unit decides which."""
    config = json.loads((STORIES / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_block = 2 * config["num_hidden_layers"] * 16 * kv_heads * head_dim * 4  # float32
    context = config["max_position_embeddings"]
    for budget, size in (("512KiB", 512 * 1024), ("0.5MB", 500_000)):
        tokens = size // bytes_per_block * 16
        assert tokens < context
        with pytest.raises(ValueError, match=rf"holds {tokens} tokens.*{context}"):
            LLM(str(STORIES), kv_cache_memory=budget, dtype="float32", device="cpu")
    LLM(str(STORIES), kv_cache_memory="1MiB", dtype="float32", device="cpu")  # enough
