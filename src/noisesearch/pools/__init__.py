"""Reward pools: rewards ``[prompt, candidate, step]`` stored for offline simulation.

``Pool`` (in-memory, validated), ``Pool.save`` (the ``noisesearch-pool`` v1 format, atomic),
``load_pool`` (that format or the shared ``<model>_<reward>_<base|naft>.npy`` layout) and
``merge_pools`` (concatenate prompt ranges). The format is specified in docs/simulator.md.
"""
from noisesearch.pools.load import (
    REFERENCE_FLOPS_PER_REWARD,
    REFERENCE_FLOPS_PER_STEP,
    load_pool,
)
from noisesearch.pools.pool import FORMAT_NAME, FORMAT_VERSION, Pool, atomic_write_json, merge_pools

__all__ = [
    "Pool",
    "load_pool",
    "merge_pools",
    "atomic_write_json",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REFERENCE_FLOPS_PER_STEP",
    "REFERENCE_FLOPS_PER_REWARD",
]
