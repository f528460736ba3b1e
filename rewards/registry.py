"""Reward registry: built-in rewards by name, user rewards by `module:function` or `file.py:function`.

A reward is a plain function `fn(completion: str, **row) -> float | dict`. The dataset row's
columns arrive as keyword arguments (`answer` is the gold final answer, `solution` the reference
solution when the set has one), so a reward takes what it needs and ignores the rest via **row.

A reward that grades the answer is the run's correctness signal: registered with
`correctness=True` (or marked `correctness: true` in the recipe), it decides accuracy, IGPO's
all-wrong trigger and replacements, and dynamic sampling. It returns 1 for a right answer; a
completion is correct when that reward's own value (before its weight) is at least 1, full marks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from rl.core.plugins import absolute_ref, defining_ref, load_object

RewardFn = Callable[..., "float | dict"]
_REGISTRY: dict[str, RewardFn] = {}


def _same_definition(a: RewardFn, b: RewardFn) -> bool:
    # One file imported twice (as a module and as `file.py:function`, or again in a worker) gives
    # two function objects for one definition: that is a re-registration, not a name clash.
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        code_a is not None
        and code_b is not None
        and a.__qualname__ == b.__qualname__
        and Path(code_a.co_filename).resolve() == Path(code_b.co_filename).resolve()
    )


def register_reward(name: str, correctness: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` selectable as `name` in a recipe's reward list. `correctness=True`
    declares that it grades the answer (1 right, 0 wrong): a recipe listing it gets its
    correctness signal from it unless the entry says `correctness: false`."""

    def wrap(fn: RewardFn) -> RewardFn:
        fn.correctness = correctness
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and not _same_definition(old, fn):
            raise ValueError(f"A reward named {name!r} is already registered ({old.__module__}.{old.__qualname__}).")
        _REGISTRY[name] = fn
        return fn

    return wrap


def is_correctness_reward(fn: RewardFn) -> bool:
    """Whether `fn` was registered as a correctness signal (register_reward(..., correctness=True))."""
    return bool(getattr(fn, "correctness", False))


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(ref: str) -> RewardFn:
    """The callable for a registered name, `module.path:function` or `path/to/file.py:function`.
    (Importing the `rewards` package registers the built-ins.)"""
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if ":" not in ref:
        raise KeyError(
            f"Unknown reward {ref!r}. Registered rewards: {', '.join(registered_rewards())}; "
            "or name your own as `module.path:function` or `path/to/file.py:function`."
        )
    fn = load_object(ref, "reward")
    if not callable(fn):
        raise AttributeError(f"Reward {ref!r}: {fn!r} is not a function.")
    return fn


def portable_ref(ref: str) -> str:
    """A reference that resolves to the same function in a fresh (spawned) process.

    Built-in names resolve anywhere. A name registered by user code only exists once that code is
    imported, so it becomes the `module:function` (or absolute `file.py:function`) that defines it.
    """
    if ":" in ref:
        return absolute_ref(ref)
    fn = get_reward(ref)
    return ref if fn.__module__.startswith("rewards.") else defining_ref(fn)
