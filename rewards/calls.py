"""Calling one reward function on one completion: arguments in, checked parts out.

Shared by the inline path and the worker processes, so both judge a result the same way.
"""
from __future__ import annotations

import inspect
import math
import numbers
import traceback
from dataclasses import dataclass

# Per-completion facts and run settings a reward receives only if it names them as parameters,
# so a `**row` catch-all sees exactly the dataset row's columns.
CONTEXT_KEYS = ("completion_tokens", "truncated", "max_tokens", "answer_fallback", "overlong_buffer_frac")


@dataclass(frozen=True)
class Signature:
    """Which keyword arguments a reward function accepts."""

    named: frozenset[str]
    var_keyword: bool

    @classmethod
    def of(cls, fn) -> "Signature":
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: pass the row as-is
            return cls(frozenset(), True)
        named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        return cls(named, any(p.kind == p.VAR_KEYWORD for p in params))

    def kwargs(self, row: dict, context: dict) -> dict:
        """The row's columns (all of them for a `**row` function) plus the context keys it names."""
        out = {k: v for k, v in row.items() if self.var_keyword or k in self.named}
        out.update((k, v) for k, v in context.items() if k in self.named)
        return out


def checked(value) -> float | dict[str, float]:
    """A reward's result as a float or a dict of floats; ValueError unless all finite numbers."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("returned an empty dict")
        return {str(part): _finite(v, f" (part {part!r})") for part, v in value.items()}
    return _finite(value, "")


def _finite(v, where: str) -> float:
    if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"returned {v!r}{where}, not a finite number")
    return float(v)


def call_reward(fn, completion: str, kwargs: dict) -> tuple[str, float | dict[str, float] | str]:
    """("ok", checked value) or ("error", what went wrong, with the traceback of an exception)."""
    try:
        value = fn(completion, **kwargs)
    except Exception as e:
        return "error", f"raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
    try:
        return "ok", checked(value)
    except ValueError as e:
        return "error", str(e)
