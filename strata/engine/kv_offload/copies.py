"""One step's copies between the KV tiers, as rank 0 plans them and every rank runs them."""

from __future__ import annotations

import msgspec

DEVICE, HOST, DISK = "GPU", "CPU", "DISK"  # vLLM's medium names; GPU = the engine's own pool
# The order a step's copies run in, before the step writes any block: the host tier's
# least recently used blocks go down to disk (their slots are written next), blocks the
# device pool evicted go to the host tier (or straight to disk when every host slot is in
# the step's copies), then hits are loaded back into device blocks (a device block evicted
# and reused in one step is saved before it is overwritten).
COPY_ORDER = ((HOST, DISK), (DEVICE, HOST), (DEVICE, DISK), (HOST, DEVICE), (DISK, DEVICE))


def transfer_type(source: str, target: str) -> str:
    """vLLM's label for copies from one medium to another ("GPU_to_CPU")."""
    return f"{source}_to_{target}"


class CopyRun(msgspec.Struct, array_like=True):
    source: str  # medium
    target: str
    source_slots: list[int]
    target_slots: list[int]


class BlockCopies(msgspec.Struct, array_like=True):
    runs: list[CopyRun] = []

    def __bool__(self) -> bool:
        return bool(self.runs)
