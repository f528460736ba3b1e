"""Score completions with the recipe's weighted rewards, inline or in killable worker processes.

A timeout scores 0 and is counted; an exception, a non-numeric or non-finite value stops the run
with a RewardError naming the function, the completion and the row, unless on_error="zero", which
scores it 0 and counts it. Every failure comes back as a RewardFailure for the run's log.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from rewards.calls import Signature, call_reward
from rewards.pool import Outcome, RewardPool, Task
from rewards.registry import get_reward, is_correctness_reward, portable_ref

# What a reward that raises or returns a non-number does (RewardScorer's `on_error`); rl.config's
# reward.on_error takes its type from here.
OnError = Literal["raise", "zero"]
ON_ERROR = get_args(OnError)


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""


def shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


@dataclass
class RewardFailure:
    """One reward call that scored 0 instead of a value."""

    index: int  # position of the completion in the scored batch
    reward: str
    kind: str  # "timeout" or "error"
    message: str
    completion: str
    row: dict


@dataclass
class ScoreResult:
    totals: list[float]
    parts: dict[str, list[float]]
    failures: list[RewardFailure] = field(default_factory=list)
    # Per completion, whether the correctness reward gave full marks; None when no reward in the set
    # is the correctness signal (never guessed from the total: a format bonus is not an answer).
    correct: list[bool] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Failure counts for the step's metrics (always present, so a 0 is a recorded 0)."""
        return {
            "reward_timeouts": sum(f.kind == "timeout" for f in self.failures),
            "reward_errors_scored_zero": sum(f.kind == "error" for f in self.failures),
        }


def log_failures(path: Path, step: int, failures: list[RewardFailure]) -> None:
    """Append each failure, with its full completion and row, to a JSON-lines file; warn on stderr."""
    if not failures:
        return
    with Path(path).open("a") as f:
        for failure in failures:
            f.write(json.dumps({"step": step, **asdict(failure)}, default=str) + "\n")
    first = failures[0]
    print(
        f"reward: {len(failures)} reward call(s) scored 0 at step {step} ({first.kind} in {first.reward!r} on "
        f"{shorten(first.completion, 120)!r}); details in {path}",
        file=sys.stderr,
        flush=True,
    )


def correctness_index(specs) -> int | None:
    """Which of the reward entries (objects with `name` and `correctness`: rl.config's RewardSpec) is
    the correctness signal: the one marked `correctness: true`, else the one registered as such
    (math_verify, first_boxed_correct), unless marked `correctness: false`. None if there is none;
    two is an error, since a run has one notion of a right answer."""
    marked = [
        i for i, spec in enumerate(specs)
        if (spec.correctness if spec.correctness is not None else is_correctness_reward(get_reward(spec.name)))
    ]
    if len(marked) > 1:
        names = ", ".join(specs[i].name for i in marked)
        raise RewardError(
            f"Rewards {names} are each a correctness signal, and a run has one notion of a right answer: mark "
            "all but one `correctness: false` in reward.functions."
        )
    return marked[0] if marked else None


def _total(value) -> float:
    # A dict reward gives its total as "total" if present, else the sum of its parts.
    if not isinstance(value, dict):
        return value
    return value["total"] if "total" in value else sum(value.values())


class RewardScorer:
    """Weighted sum of rewards. `workers` > 0 runs them in a process pool with a hard timeout."""

    def __init__(
        self,
        specs: list[tuple[str, float]],
        workers: int = 0,
        timeout_s: float = 10.0,
        on_error: str = "raise",
        settings: dict | None = None,
        correctness: int | None = None,
    ):
        """`specs`: (reward name, weight) pairs; `correctness`: the index of the one that is the
        correctness signal (see correctness_index), or None."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.names = [name for name, _ in specs]
        # A float reward is logged under its function name ("short" for "my_rewards.py:short").
        self.part_names = [name.rsplit(":", 1)[-1] for name in self.names]
        self.weights = [float(weight) for _, weight in specs]
        self.fns = [get_reward(name) for name in self.names]
        self.signatures = [Signature.of(fn) for fn in self.fns]
        self.on_error, self.settings = on_error, dict(settings or {})
        self.correctness = correctness
        self.pool = RewardPool([portable_ref(n) for n in self.names], workers, timeout_s) if workers > 0 else None

    @classmethod
    def from_config(cls, cfg, max_tokens: int | None = None) -> "RewardScorer":
        """From a RewardConfig; `max_tokens` (rollout.max_tokens) is passed to rewards that name it."""
        settings = {"answer_fallback": cfg.answer_fallback, "overlong_buffer_frac": cfg.overlong_buffer_frac}
        if max_tokens is not None:
            settings["max_tokens"] = max_tokens
        return cls(
            [(f.name, f.weight) for f in cfg.functions], cfg.workers, cfg.timeout_s, cfg.on_error, settings,
            correctness_index(cfg.functions),
        )

    def score(self, completions: list[str], rows: list[dict], info: list[dict] | None = None) -> ScoreResult:
        """Weighted total per completion and each named part; `info` adds per-completion context
        (completion_tokens, truncated) for the rewards that name it."""
        if len(rows) != len(completions) or (info is not None and len(info) != len(completions)):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows / {len(info or [])} info entries")
        tasks = [
            Task(j, text, sig.kwargs(row, {**self.settings, **(info[i] if info else {})}))
            for i, (text, row) in enumerate(zip(completions, rows))
            for j, sig in enumerate(self.signatures)
        ]
        outcomes = self.pool.run(tasks) if self.pool else [self._inline(t) for t in tasks]
        return self._combine(completions, rows, outcomes)

    def _inline(self, task: Task) -> Outcome:
        return Outcome(*call_reward(self.fns[task.reward_index], task.completion, task.kwargs))

    def _combine(self, completions, rows, outcomes) -> ScoreResult:
        n, per = len(completions), len(self.names)
        totals = [0.0] * n
        parts: dict[str, list[float]] = {}
        owner: dict[str, str] = {}
        failures = []
        # A correctness call that timed out (or failed with on_error=zero) counts as wrong.
        correct = None if self.correctness is None else [False] * n
        for k, outcome in enumerate(outcomes):
            i, j = divmod(k, per)
            name = self.names[j]
            if outcome.status != "ok":
                failures.append(RewardFailure(i, name, outcome.status, outcome.value, completions[i], rows[i]))
                continue
            if j == self.correctness:
                correct[i] = _total(outcome.value) >= 1.0
            totals[i] += self.weights[j] * _total(outcome.value)
            for part, v in self._parts(j, outcome.value).items():
                if owner.setdefault(part, name) != name:
                    raise RewardError(f"Rewards {owner[part]!r} and {name!r} both produce a part named {part!r}; rename one.")
                parts.setdefault(part, [0.0] * n)[i] = v
        self._raise_first_error(failures)
        return ScoreResult(totals, parts, failures, correct)

    def _parts(self, j: int, value) -> dict[str, float]:
        """A float under the reward's part name; a dict's parts, its "total" under the reward's name."""
        if not isinstance(value, dict):
            return {self.part_names[j]: value}
        parts = dict(value)
        if "total" in parts:
            parts[self.part_names[j]] = parts.pop("total")
        return parts

    def _raise_first_error(self, failures: list[RewardFailure]) -> None:
        errors = [f for f in failures if f.kind == "error"]
        if errors and self.on_error == "raise":
            f = errors[0]
            raise RewardError(
                f"Reward {f.reward!r} {f.message.rstrip()}\n  completion {f.index}: {shorten(f.completion)!r}\n"
                f"  row: {shorten(repr(f.row))}\n"
                f"({len(errors)} such failure(s) in this batch. Fix the function, or set reward.on_error=zero "
                "to score such cases 0 and count them.)"
            )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
