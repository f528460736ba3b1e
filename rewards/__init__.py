"""Verifiable rewards: `fn(completion: str, **row) -> float | dict`, selected by name."""
from rewards.registry import get_reward, register_reward, registered_rewards

__all__ = ["get_reward", "register_reward", "registered_rewards"]
