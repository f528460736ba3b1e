"""Algorithms selected by name (`algorithm=grpo`); importing this package registers the built-ins."""
from rl.algorithms.base import Algorithm, Rollouts, build_algorithm, register_algorithm, registered_algorithms
from rl.algorithms import grpo, opsd  # noqa: F401  (registers "grpo" and "opsd")

__all__ = ["Algorithm", "Rollouts", "build_algorithm", "register_algorithm", "registered_algorithms"]
