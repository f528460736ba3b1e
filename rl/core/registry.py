"""Registries: things selected by name in a recipe (advantage estimators, policy losses,
likelihood estimators, algorithms, rollout engines), or by `path/to/file.py:Name` /
`module.path:Name` for user code that was never registered."""
from __future__ import annotations

from rl.core.plugins import load_object


class Registry(dict):
    """Name -> object. `@registry.register(name)` adds one (a plug-in's too), `lookup(ref)` finds a
    registered name or loads `file.py:Name` / `module:Name`, and names the registered ones when
    neither works."""

    def __init__(self, what: str, noun: str = "function"):
        super().__init__()
        self.what, self.noun = what, noun

    def register(self, name: str):
        def wrap(obj):
            self[name] = obj
            return obj

        return wrap

    def lookup(self, ref: str):
        if ref in self:
            return self[ref]
        if ":" in ref:
            return load_object(ref, self.what, self.noun)
        raise KeyError(
            f"Unknown {self.what} {ref!r}; registered: {', '.join(sorted(self))}; or name your own as "
            f"`path/to/file.py:Name` (or `module.path:Name`)."
        )
