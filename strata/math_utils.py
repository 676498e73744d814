"""Small integer arithmetic shared by the engine, its KV transport and the benchmarks."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: the blocks that a tokens fill, b to a block."""
    return -(-a // b)
