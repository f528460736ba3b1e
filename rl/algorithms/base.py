"""What an algorithm is to the training loop, and the registry that selects one by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rl.learner.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rollouts.types import Completion, SamplingSpec


@dataclass
class Rollouts:
    """One step's generations: `completions[i]` are the samples for `rows[i]`."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    rewards: list[list[float]] = field(default_factory=list)


@dataclass
class SampledRound:
    """One sampling round's groups as scored, before the algorithm keeps or drops them:
    `completions[i]`, `rewards[i]` and `correct[i]` are the samples of `rows[i]`."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    rewards: list[list[float]]
    correct: list[list[bool]]


class Algorithm:
    """Hooks the loop calls; the learner only ever sees `loss` (a picklable callable).

    needs_reference: the loop fills token_fields["ref_logprobs"] from the frozen reference.
    needs_policy_scores: the loop scores the batch with the learner before the first update
    (logprobs, and entropies if wants_entropy) and hands them to `use_policy_scores`.
    policy_scores_from_training: the loop hands `use_policy_scores` the log-probs the training
    forward itself computed (the policy before the update, no forward of their own; entropies
    None), after the step: for metrics that nothing in the loss depends on. The loss must pass
    them on with `out.keep_logprobs`. Only with updates_per_batch == 1 and needs_policy_scores False.
    needs_teacher: batches carry a teacher view; the learner keeps a teacher model to score it.
    """

    needs_reference: bool = False
    needs_policy_scores: bool = False
    policy_scores_from_training: bool = False
    wants_entropy: bool = False
    needs_teacher: bool = False
    updates_per_batch: int = 1
    max_sampling_rounds: int = 1

    def keep_group(self, rewards: list[float]) -> bool:
        """Whether a prompt's group goes into the batch (False: resample, as in dynamic sampling)."""
        return True

    def repair_groups(self, sampled: SampledRound, generate, score) -> list[Completion]:
        """Called on every sampling round after scoring, before keep_group; may replace completions
        and their rewards in `sampled` in place (IGPO's inpainting). `generate(prompts, spec, hints)`
        samples with the loop's engines, `score(completions, rows)` gives (rewards, correct).
        Returns every completion it generated: their tokens count in the rollout budget."""
        return []

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> dict[str, float]:
        """Current-policy logprobs/entropies per completion token, before any update."""
        return {}

    def attach_tokenizer(self, tokenizer) -> None:
        """Called once before training, for algorithms that build prompts of their own."""

    def loss_temperature(self) -> float:
        """The learner divides logits by this before the loss (the sampling temperature for
        importance ratios that compare with the engine's sampling distribution)."""
        return 1.0

    def sampling_spec(self) -> SamplingSpec:
        raise NotImplementedError

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        raise NotImplementedError

    def loss(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


_ALGORITHMS: dict[str, Callable[..., Algorithm]] = {}


def register_algorithm(name: str):
    """Decorator: `algorithm=<name>` in a recipe builds this class from the RunConfig."""

    def wrap(cls):
        _ALGORITHMS[name] = cls
        return cls

    return wrap


def registered_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def build_algorithm(cfg) -> Algorithm:
    if cfg.algorithm == "sft":
        raise KeyError(
            "algorithm=sft is the supervised baseline, trained by TRL's SFTTrainer rather than this RL loop: "
            f"run it with `python -m rl.sft recipe={cfg.recipe}`."
        )
    if cfg.algorithm not in _ALGORITHMS:
        raise KeyError(
            f"Unknown algorithm {cfg.algorithm!r}. Registered: {', '.join(registered_algorithms())}. "
            "Register your own with @register_algorithm(name) in a module imported before launch."
        )
    return _ALGORITHMS[cfg.algorithm](cfg)
