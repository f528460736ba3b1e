"""Algorithms selected by name (`algorithm=grpo`); importing this package registers the built-ins."""
from rl.algorithms.base import Algorithm, Rollouts, build_algorithm, register_algorithm, registered_algorithms
from rl.algorithms import grpo, igpo, opsd  # noqa: F401  (registers grpo, opsd, igpo and diffu_grpo)

__all__ = ["Algorithm", "Rollouts", "build_algorithm", "register_algorithm", "registered_algorithms"]
