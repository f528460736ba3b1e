"""The sections a run carries by what it names: the algorithm's (typed by its class's `Config`, under its `name`) and the rollout engine's (under `rollout.<name>`)."""
from __future__ import annotations

import difflib

from pydantic import BaseModel

from rl.algorithms import algorithm_class, registered_algorithms
from rollouts.registry import engine_class


def algorithm_section(ref: str) -> tuple[str | None, type[BaseModel] | None]:
    """(section name, its Config class) of `algorithm=<ref>`; (None, None) for rl.sft's baseline,
    which runs no RL algorithm. Loads a user's `file.py:Class` the first time it is named."""
    if ref == "sft":
        return None, None
    try:
        cls = algorithm_class(ref)
    except (KeyError, ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"algorithm={ref}: {e.args[0] if e.args else e}") from None
    return cls.name, cls.Config


def stray_key_message(key: str, ref: str, section: str | None, run_cls: type[BaseModel]) -> str:
    own = f"its options go in section `{section}`" if section else "it has no algorithm section"
    if key in registered_algorithms():  # a built-in's section is named after it
        return (f"Section `{key}` configures algorithm {key}, but this run's algorithm is {ref}: {own}. "
                f"Move the options there, or set algorithm={key}.")
    allowed = list(run_cls.model_fields) + ([section] if section else [])
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"Unknown config key `{key}`.{hint} Allowed keys here: {', '.join(allowed)}."


def engine_section(ref: str) -> tuple[str | None, type[BaseModel] | None]:
    """(section name under `rollout`, its Config class) of `rollout.engine=<ref>`; (None, None) for
    an engine without options of its own. Loads a user's `file.py:Class` the first time it is named."""
    try:
        cls = engine_class(ref)
    except (KeyError, ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"rollout.engine={ref}: {e.args[0] if e.args else e}") from None
    return (None, None) if cls.Config is None else (cls.name, cls.Config)
