"""Rewards (verifiers): score(images in [0, 1], prompts) -> tensor[B], with cost metadata.

A reward is a spec string, a ``Reward`` object or a plain function ``f(images, prompts) -> [B]``
(see :mod:`noisesearch.rewards.base`); :func:`as_reward` resolves any of them."""
from noisesearch.rewards.base import (
    REWARDS,
    Comparative,
    FunctionReward,
    RankSum,
    Reward,
    WeightedSum,
    as_reward,
    at_step,
    is_comparative,
    is_noise_aware,
    make_reward,
    register_reward,
    score,
    split_specs,
    with_flops,
)

__all__ = ["Reward", "REWARDS", "FunctionReward", "as_reward", "make_reward", "register_reward", "score", "split_specs",
           "with_flops", "WeightedSum", "RankSum", "Comparative", "is_comparative", "is_noise_aware", "at_step"]
