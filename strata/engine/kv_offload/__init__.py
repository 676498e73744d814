"""The KV tiers under the device pool (vLLM's KV offloading, SGLang's HiCache).

Blocks the prefix cache evicts from the device pool are copied to a host-memory tier
("CPU"), and from there, when it is full, to an optional disk tier ("DISK"); a prompt
whose next blocks are in a tier has them copied back into device blocks instead of
computing them. Rank 0 keeps the index (`manager.OffloadManager`, by chained block hash,
least recently used out first) and plans each step's copies (`copies.BlockCopies`); every
rank runs them on its own shard (`stores.TierStores`) before anything writes a block.
"""
