"""Verifiable rewards: `fn(completion: str, **row) -> float | dict`, selected by name.

Importing the package registers the built-ins (rewards.math, and d1's rewards in rewards.d1)."""
from rewards.registry import get_reward, register_reward, registered_rewards
from rewards.scoring import RewardError, RewardScorer
from rewards import d1, math  # noqa: E402,F401  (registers the built-in rewards)

__all__ = ["RewardError", "RewardScorer", "get_reward", "register_reward", "registered_rewards"]
