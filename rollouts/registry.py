"""Rollout engines by name (`rollout.engine=vllm|hf|diffusion`), or a user's class as
`rollout.engine=path/to/file.py:Class`; `make_engine` builds one. The built-ins are registered as
`module:Class` references and imported on first use, so that naming an engine loads no vLLM."""
from __future__ import annotations

from rl.core.plugins import load_object
from rl.core.registry import Registry
from rl.core.types import EngineSettings
from rollouts.engine import RolloutEngine

ENGINES = Registry("rollout engine", "class")


def register_engine(name: str, engine: type[RolloutEngine] | str) -> None:
    """`rollout.engine=<name>` selects `engine`: a RolloutEngine subclass, or `module:Class` to
    import when first named."""
    ENGINES[name] = engine


register_engine("vllm", "rollouts.vllm_engine:VLLMEngine")
register_engine("hf", "rollouts.hf_engine:HFEngine")
register_engine("diffusion", "rollouts.diffusion_engine:MaskedDiffusionEngine")


def engine_class(ref: str) -> type[RolloutEngine]:
    """The class `rollout.engine=<ref>` names: a registered name, `file.py:Class` or `module:Class`."""
    cls = ENGINES.lookup(ref)
    if isinstance(cls, str):
        cls = load_object(cls, "rollout engine", "class")
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise TypeError(f"rollout.engine={ref} is not a subclass of rollouts.engine.RolloutEngine.")
    if not hasattr(cls, "name"):
        raise TypeError(f"rollout.engine={ref} must set the class attribute `name` (see rollouts.engine).")
    return cls


def make_engine(kind: str, model_path: str, *, seed: int, settings: EngineSettings | None = None,
                **setting_fields) -> RolloutEngine:
    """Build engine `kind` for `model_path` with `settings` (or EngineSettings' fields as keywords)."""
    return engine_class(kind).from_settings(model_path, seed, settings or EngineSettings(**setting_fields))
