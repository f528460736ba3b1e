"""Verifiable rewards: `fn(completion: str, **row) -> float | dict`, selected by name."""
from rewards.registry import get_reward, register_reward, registered_rewards
from rewards.scoring import RewardError, RewardScorer

__all__ = ["RewardError", "RewardScorer", "get_reward", "register_reward", "registered_rewards"]
