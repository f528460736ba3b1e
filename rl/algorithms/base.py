"""What an algorithm is to the training loop, and the registry that selects one by name or file.

An algorithm is one class, in one file (rl/algorithms/ or anywhere): its config section (`Config`,
a pydantic model, read as the recipe section named `name`), what it needs from the loop
(`requirements`, one frozen object), the loss the learner runs (`loss`, a small picklable callable:
it travels to every learner rank every step), and hooks the loop calls. Hooks return new values;
they never edit their arguments, and nothing is carried from one hook to the next except through
what the loop hands back (Rollouts.repair_counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel

from rl.core.registry import Registry

from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.core.types import Completion, SamplingSpec


@dataclass
class Rollouts:
    """One step's generations: `completions[i]` are the samples for `rows[i]`. `repair_counts` sums
    the counts every sampling round's repair_groups returned."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    rewards: list[list[float]] = field(default_factory=list)
    repair_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SampledRound:
    """One sampling round's groups as scored, before the algorithm keeps or drops them:
    `completions[i]`, `rewards[i]` and `correct[i]` are the samples of `rows[i]`."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    rewards: list[list[float]]
    correct: list[list[bool]]


@dataclass(frozen=True)
class Repair:
    """What repair_groups returns: the round to keep or drop groups from (the given one when nothing
    was replaced), every completion it generated (their tokens count in the rollout budget), and
    counts the loop sums over the step's rounds into Rollouts.repair_counts."""

    sampled: SampledRound
    generated: list[Completion] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    """What an algorithm needs from the loop and the learner, decided once from its config.

    reference: the loop fills token_fields["ref_logprobs"] from the frozen initial policy.
    teacher: the teacher settings (OPSD's TeacherConfig) when batches carry a teacher view; the
        learner then keeps that teacher model. None: no teacher.
    policy_scores: the loop scores the batch with the learner before the first update (log-probs,
        and entropies with `entropy`) and hands them to `use_policy_scores`.
    policy_scores_from_training: instead, `use_policy_scores` gets the log-probs the training
        forward computed (the policy before the update; entropies None), after the step, for
        metrics nothing in the loss depends on. The loss passes them on with `out.keep_logprobs`.
    updates_per_batch: optimizer steps per rollout batch.
    sampling_rounds: most generation rounds per step while keep_group drops groups.
    prompt_mask_prob: masked-diffusion models: the prompt-masking probability of the one-step
        estimator, which the learner and the engines must apply alike.
    """

    reference: bool = False
    teacher: Any = None
    policy_scores: bool = False
    policy_scores_from_training: bool = False
    entropy: bool = False
    updates_per_batch: int = 1
    sampling_rounds: int = 1
    prompt_mask_prob: float = 0.0

    def __post_init__(self):
        if self.policy_scores_from_training and (self.policy_scores or self.updates_per_batch != 1):
            raise ValueError(
                "policy_scores_from_training reads the scores of the one training forward: it needs "
                "updates_per_batch == 1 and policy_scores False (those scores come before the loss)."
            )


class Algorithm:
    """Subclass this, set `name` (the recipe section it reads) and `Config`, set `requirements` and
    `loss` in __init__(cfg), and implement sampling_spec and build_batch."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    requirements: Requirements = Requirements()
    # loss(out, mb) -> (loss, metrics): a picklable callable holding only the loss options (a frozen
    # dataclass), set in __init__. The learner receives it, never the algorithm and its tokenizer.
    loss: Callable[[PolicyOutputs, MicroBatch], tuple[torch.Tensor, dict[str, float]]]

    def __init__(self, cfg):
        self.cfg = cfg.algorithm_section

    def needs_correctness(self) -> str | None:
        """What of this algorithm reads the correctness signal (SampledRound.correct), as a phrase for
        the error a reward set without one gets; None when nothing does."""
        return None

    def keep_group(self, rewards: list[float], correct: list[bool]) -> bool:
        """Whether a prompt's group goes into the batch (False: resample, as in dynamic sampling);
        `correct` is empty when the reward set has no correctness signal (needs_correctness None)."""
        return True

    def repair_groups(self, sampled: SampledRound, generate, score) -> Repair:
        """Called on every sampling round after scoring, before keep_group; may return a round with
        some completions replaced (IGPO's inpainting). `generate(prompts, spec, hints)` samples with
        the loop's engines, `score(completions, rows)` gives (rewards, correct); `correct` comes from
        the correctness reward (empty lists when the reward set has none)."""
        return Repair(sampled)

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> tuple[SequenceBatch, dict[str, float]]:
        """Current-policy logprobs/entropies per completion token, before any update: the batch to
        train on (a new one when fields change) and metrics."""
        return batch, {}

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


# Algorithms by name. Importing the `rl.algorithms` package registers the built-ins, so callers
# look them up through it (rl.algorithms.algorithm_class), never through this module alone.
ALGORITHMS = Registry("algorithm", "class")


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: `algorithm=<cls.name>` selects it. A user's algorithm needs no registration:
    name it as `algorithm=path/to/file.py:Class` (or `module.path:Class`), or register it in a
    `plugins` file."""
    ALGORITHMS[cls.name] = cls
    return cls


def registered_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def algorithm_class(ref: str) -> type[Algorithm]:
    """The class `algorithm=<ref>` names: a registered name, `file.py:Class` or `module:Class`."""
    cls = ALGORITHMS.lookup(ref)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"algorithm={ref} is not a subclass of rl.algorithms.Algorithm.")
    for attr in ("name", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"algorithm={ref} must set the class attribute `{attr}` (see rl.algorithms.base).")
    return cls


def build_algorithm(cfg) -> Algorithm:
    """The run's algorithm, refused (RewardError) when it reads the correctness signal and the
    reward set has none."""
    if cfg.algorithm == "sft":
        raise KeyError(
            "algorithm=sft is the supervised baseline, trained by TRL's SFTTrainer rather than this RL loop: "
            f"run it with `python -m rl.sft recipe={cfg.recipe}`."
        )
    algorithm = algorithm_class(cfg.algorithm)(cfg)
    _check_correctness_signal(cfg, algorithm)
    return algorithm


def _check_correctness_signal(cfg, algorithm: Algorithm) -> None:
    from rewards.scoring import RewardError, correctness_index

    use = algorithm.needs_correctness()
    if use is None or correctness_index(cfg.reward.functions) is not None:
        return
    names = ", ".join(f.name for f in cfg.reward.functions)
    raise RewardError(
        f"algorithm={cfg.algorithm} needs to know which completions are right, for {use}, but no reward in "
        f"reward.functions ({names}) is the correctness signal. Add one that grades the answer (math_verify, or "
        "first_boxed_correct as IGPO's release scores), or mark your own grading reward `correctness: true` in "
        "reward.functions (or register it with @register_reward(name, correctness=True)). A total reward is "
        "never taken for correctness: a format bonus is not a right answer."
    )
