"""Score completions with the recipe's weighted rewards; failures are loud and attributed."""
from __future__ import annotations

import math

from rewards.registry import get_reward


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


class RewardScorer:
    def __init__(self, specs: list[tuple[str, float]]):
        self.rewards = [(name, get_reward(name), weight) for name, weight in specs]

    def _call(self, name, fn, completion: str, row: dict) -> dict[str, float]:
        try:
            value = fn(completion, **row)
        except Exception as e:
            raise RewardError(
                f"Reward {name!r} raised {type(e).__name__}: {e}\n  completion: {_shorten(completion)!r}\n"
                f"  row: {_shorten(repr(row))}"
            ) from e
        parts = value if isinstance(value, dict) else {name: value}
        for part, v in parts.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardError(
                    f"Reward {name!r} returned a non-finite or non-numeric value {v!r} (part {part!r})\n"
                    f"  completion: {_shorten(completion)!r}\n  row: {_shorten(repr(row))}"
                )
        return {k: float(v) for k, v in parts.items()}

    def score(self, completions: list[str], rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """Weighted total per completion, and each named part (a dict reward's keys, else its name)."""
        totals = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for name, fn, weight in self.rewards:
            for i, (text, row) in enumerate(zip(completions, rows)):
                values = self._call(name, fn, text, row)
                # A dict reward gives its total as "total" if present, else the sum of its parts.
                total = values.get("total", sum(values.values()))
                totals[i] += weight * total
                for part, v in values.items():
                    parts.setdefault(part, [0.0] * len(completions))[i] = v
        return totals, parts
