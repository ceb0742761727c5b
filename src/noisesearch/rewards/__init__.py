"""Rewards (verifiers): score(images in [0, 1], prompts) -> tensor[B], with cost metadata."""
from noisesearch.rewards.base import (
    REWARDS,
    Comparative,
    RankSum,
    Reward,
    WeightedSum,
    at_step,
    is_comparative,
    is_noise_aware,
    make_reward,
    register_reward,
    score,
)

__all__ = ["Reward", "REWARDS", "make_reward", "register_reward", "score", "WeightedSum", "RankSum", "Comparative",
           "is_comparative", "is_noise_aware", "at_step"]
