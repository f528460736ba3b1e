"""Generation side: rollout engines (vLLM, HF, masked diffusion) by name, and the Ray pool that drives them.

Names are resolved lazily so that `import rollouts` pulls in neither vLLM nor Ray.
"""
from importlib import import_module

_EXPORTS = {
    "RolloutEngine": "rollouts.engine",
    "make_engine": "rollouts.registry",
    "register_engine": "rollouts.registry",
    "RolloutPool": "rollouts.pool",
    "RolloutEngineError": "rollouts.pool",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rollouts' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
