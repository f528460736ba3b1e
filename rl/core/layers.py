"""Which layer of the library may import which, from the bottom up. A module belongs to the layer
of the longest prefix of its name listed here. A layer may import itself and the layers listed
as below it, and nothing else, at module level or inside a function;
tests/unit/test_architecture.py holds every module to this (scripts/architecture.py reports it)."""
from __future__ import annotations

LAYERS: dict[str, tuple[str, ...]] = {
    # Types, the chunked log-prob kernels, actor helpers, the one loader of user code: imports nothing of ours.
    "core": ("rl.core",),
    # Reward functions and their scoring; rollout engines, samplers and the pool.
    "rewards": ("rewards",),
    "rollouts": ("rollouts",),
    # Data sets and prompts, model paths, command-line parsing.
    "data": ("rl.data", "rl.models", "rl.cli"),
    # Algorithms: one file each, registered by name.
    "algorithms": ("rl.algorithms",),
    # The typed config schema and recipe loading (it validates each algorithm's and engine's own section).
    "config": ("rl.config",),
    # The DeepSpeed learner ranks; the weight transports between learner and engines.
    "learner": ("rl.learner",),
    "sync": ("rl.sync",),
    # The training loop and the tools around it.
    "loop": ("rl.loop", "rl.evaluate", "rl.compare", "rl.plot", "rl.sft", "rl.demo", "rewards.check"),
    "entry": ("rl.launch", "rl"),
}

BELOW: dict[str, tuple[str, ...]] = {
    "core": (),
    "rewards": ("core",),
    "rollouts": ("core",),
    "data": ("core", "rewards"),
    "algorithms": ("core", "rewards", "rollouts", "data"),
    "config": ("core", "rewards", "rollouts", "data", "algorithms"),
    "learner": ("core", "rollouts", "data", "config"),
    "sync": ("core", "rollouts", "data", "config", "learner"),
    "loop": ("core", "rewards", "rollouts", "data", "algorithms", "config", "learner", "sync"),
    "entry": ("core", "rewards", "rollouts", "data", "algorithms", "config", "learner", "sync", "loop"),
}


def layer_of(module: str) -> str:
    best, layer = "", "entry"
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, layer = prefix, name
    return layer


def allowed(importer: str, imported: str) -> bool:
    """Whether layer `importer` may import layer `imported`."""
    return importer == imported or imported in BELOW[importer]


def describe() -> str:
    """The layering in a few lines, for `python -m rl.launch --help` and the README."""
    return "\n".join(
        f"  {name:<10} {', '.join(LAYERS[name]):<48} may import: {', '.join(BELOW[name]) or 'nothing of ours'}"
        for name in LAYERS
    )
