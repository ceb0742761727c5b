"""Rewards (verifiers): score(images in [0, 1], prompts) -> tensor[B], with cost metadata."""
from noisesearch.rewards.base import REWARDS, RankSum, Reward, WeightedSum, make_reward, register_reward, score

__all__ = ["Reward", "REWARDS", "make_reward", "register_reward", "score", "WeightedSum", "RankSum"]
