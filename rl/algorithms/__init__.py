"""Algorithms selected by name (`algorithm=grpo`) or from a user's file (`algorithm=path/to/file.py:Class`);
importing this package registers the built-ins."""
from rl.algorithms.base import (
    Algorithm, Repair, Requirements, Rollouts, SampledRound, algorithm_class, build_algorithm, register_algorithm,
    registered_algorithms,
)
from rl.algorithms import grpo, diffu_grpo, igpo, opsd  # noqa: F401,E402  (registers the built-ins)

__all__ = ["Algorithm", "Repair", "Requirements", "Rollouts", "SampledRound", "algorithm_class", "build_algorithm",
           "register_algorithm", "registered_algorithms"]
