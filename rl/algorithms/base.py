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
from typing import Any, Callable, ClassVar, Protocol

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
class ScoringEngines:
    """Engines of their own in the Ray pool that hold another, frozen model and score the loop's
    sequences (`RolloutPool.score`): a teacher too large to sit beside the student on the learner
    ranks. `name` tells an algorithm's several such models apart."""

    name: str
    model_path: str
    num_engines: int = 1
    gpus_per_engine: int = 1
    max_model_len: int | None = None  # None: the model's own context, at most 4096


@dataclass(frozen=True)
class Requirements:
    """What an algorithm needs built before the first step, decided once from its config.

    reference: the learner keeps the frozen initial policy (`Learner.score(..., reference=True)`).
    teacher: the teacher settings (OPSD's TeacherConfig) when batches carry a teacher view; the
        learner then keeps that teacher model. None: no teacher.
    updates_per_batch: optimizer steps per rollout batch (the learning-rate schedule counts them).
    sampling_rounds: most generation rounds per step while keep_group drops groups.
    prompt_mask_prob: masked-diffusion models: the prompt-masking probability of the one-step
        estimator, which the learner and the engines must apply alike.
    estimator, estimator_samples: masked-diffusion models: the likelihood estimator (rollouts.estimators)
        and its n, which the learner and the engines must use alike.
    scoring_engines: engines the loop starts for other models (one ScoringEngines each) and hands
        to `Algorithm.attach_scoring_engines` before the first step. Empty: none.
    """

    reference: bool = False
    teacher: Any = None
    updates_per_batch: int = 1
    sampling_rounds: int = 1
    prompt_mask_prob: float = 0.0
    estimator: str = "one_step"
    estimator_samples: int = 1
    scoring_engines: tuple[ScoringEngines, ...] = ()


class Learner(Protocol):
    """The learner as an algorithm sees it: score a batch, train on it. The loop binds the
    algorithm's loss temperature and records every update (the divergence guard)."""

    def score(self, batch: SequenceBatch, *, reference: bool = False,
              entropy: bool = False) -> tuple[list[list[float]], list[list[float]] | None]:
        """Per completion token: log-probs under the current policy (the frozen reference with
        `reference`), and their entropies with `entropy` (else None)."""

    def train(self, batch: SequenceBatch, loss, *, return_logprobs: bool = False):
        """One optimizer step on `batch` with `loss`: its metrics, and with `return_logprobs` also the
        log-probs the training forward computed (the policy before the step)."""


@dataclass(frozen=True)
class Update:
    """What `Algorithm.update` returns: the last optimizer step's metrics (the learner's sums, loss,
    grad norm, lr), the algorithm's own metrics, and the batch the weight-sync check re-scores."""

    train_metrics: dict[str, float]
    metrics: dict[str, float]
    checked: SequenceBatch


class Algorithm:
    """Subclass this, set `name` (the recipe section it reads) and `Config`, set `requirements` and
    `loss` in __init__(cfg), and implement sampling_spec and build_batch. Each step the loop calls
    build_batch, then prepare (what the updates need from the learner), then update (the
    optimizer steps); hooks return new values and never edit their arguments."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    requirements: Requirements = Requirements()
    # loss(out, mb) -> (loss, metrics): a picklable callable holding only the loss options (a frozen
    # dataclass), set in __init__. The learner receives it, never the algorithm and its tokenizer.
    loss: Callable[[PolicyOutputs, MicroBatch], tuple[torch.Tensor, dict[str, float]]]

    def __init__(self, cfg):
        self.cfg = cfg.algorithm_section

    def provides(self) -> set[str]:
        """Which of the names the loop's checks read (rl.core.contracts) this algorithm's batches
        carry or its metrics report; each one missing turns a check off, which the launch names."""
        return set()

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

    def prepare(self, batch: SequenceBatch, learner: Learner) -> tuple[SequenceBatch, dict[str, float]]:
        """Before the step's first update: what the updates need from the learner (reference or
        old-policy log-probs, entropies), as a new batch, and metrics."""
        return batch, {}

    def update(self, batch: SequenceBatch, learner: Learner) -> Update:
        """The step's optimizer steps (`requirements.updates_per_batch` of them on the same batch)."""
        train_metrics: dict[str, float] = {}
        for _ in range(self.requirements.updates_per_batch):
            train_metrics = learner.train(batch, self.loss)
        return Update(train_metrics, {}, batch)

    def attach_tokenizer(self, tokenizer) -> None:
        """Called once before training, for algorithms that build prompts of their own."""

    def attach_scoring_engines(self, engines) -> None:
        """Called once before training when `requirements.scoring_engines` asks for engines: {name:
        rollouts.pool.RolloutPool}, each pool's `score(requests)` giving the log-probs of given tokens."""
        raise NotImplementedError(f"{type(self).__name__} asks for scoring engines but does not take them.")

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
