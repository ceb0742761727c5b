"""Reward pools: rewards ``[prompt, candidate, step]`` stored for offline simulation.

``Pool`` (in-memory, validated), ``Pool.save`` (the ``noisesearch-pool`` v1 format, atomic),
``load_pool`` (that format or the shared ``<model>_<reward>_<base|naft>.npy`` layout) and
``merge_pools`` (concatenate prompt ranges); ``pools.parts`` (a pool in the making: one part per
prompt, checked for what it holds) and ``pools.images`` (the stored estimates: PNG / WebP per
prompt, read one at a time by ``PoolImages``). The format is specified in docs/simulator.md. Running
a model to fill a pool is ``noisesearch.api.pool``.
"""
from noisesearch.pools.images import PoolImages, load_pool_images
from noisesearch.pools.load import (
    REFERENCE_FLOPS_PER_REWARD,
    REFERENCE_FLOPS_PER_STEP,
    load_pool,
)
from noisesearch.pools.parts import pool_reward_name
from noisesearch.pools.pool import FORMAT_NAME, FORMAT_VERSION, Pool, atomic_write_json, merge_pools

__all__ = [
    "Pool",
    "load_pool",
    "merge_pools",
    "PoolImages",
    "load_pool_images",
    "pool_reward_name",
    "atomic_write_json",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REFERENCE_FLOPS_PER_STEP",
    "REFERENCE_FLOPS_PER_REWARD",
]
