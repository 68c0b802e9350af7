"""Where batches go, as the agent sees it: a sink is a callable taking a Batch.

The agent never knows what a sink is (a terminal printer, a recording, a ZeroMQ
stream, an embedded collector); the CLI decides. A sink that can fail to deliver
counts what it lost instead of raising, and those counts ride in every batch as
``<name>.dropped_batches`` / ``<name>.dropped_events``: ``name`` is part of the wire.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .schema import Batch


@runtime_checkable
class Sink(Protocol):
    def __call__(self, batch: Batch) -> None: ...


LOSS_COUNTERS = ("dropped_batches", "dropped_events")


def loss_counters(sinks) -> dict:
    """{'<sink name>.dropped_batches': n, ...} for every sink that counts losses."""
    out = {}
    for s in sinks:
        name = getattr(s, "name", None)
        if not name:
            continue
        for attr in LOSS_COUNTERS:
            if hasattr(s, attr):
                out[f"{name}.{attr}"] = int(getattr(s, attr))
    return out


def is_loss_counter(key: str) -> bool:
    """True for counters that count data lost (kernel ring, sinks)."""
    return ".lost" in key or key.endswith(".dropped_events")
