"""Several processes (``accelerate launch`` / ``torchrun``): who am I, and how many are we.

``dist_state(device)`` is accelerate's ``PartialState`` when the run was launched with more than one
process, else None. ``pool`` shards prompts and ``generate`` shards searches over the processes
(:func:`noisesearch.api.generate` ``shard=``); every candidate keeps its own noise stream, so a
sharded run equals the single-process run up to float rounding.
"""
from __future__ import annotations

import os

from noisesearch.errors import NoiseSearchError


def dist_state(device: str):
    """accelerate's PartialState when launched with several processes, else None (one process)."""
    launched = any(int(os.environ.get(k, "1") or 1) > 1 for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched:
        return None
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is an optional dependency
        raise NoiseSearchError("sharding over processes needs accelerate: pip install accelerate") from None
    return PartialState(cpu=not str(device).startswith("cuda"))
