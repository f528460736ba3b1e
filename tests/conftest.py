import hashlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; tests create and kill their own actors. Always a new
    cluster (address="local"): a plain ray.init() would join whatever cluster /tmp/ray names, a dead
    one included."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shared_model(folder: Path):
    """Yields a model folder shared by every test of the session, then fails the session's
    teardown if any test changed it: a test that mutates a model must copy it first."""
    before = _digest(folder)
    yield folder
    assert _digest(folder) == before, f"a test changed the shared model folder {folder}: copy it before changing it"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The random tiny tied Qwen3 of rl.demo.tiny.build_model (hidden 64, 2 layers), built once."""
    from rl.demo.tiny import build_model

    yield from _shared_model(build_model(tmp_path_factory.mktemp("tiny") / "model", arch="qwen3", tied=True))


@pytest.fixture(scope="session")
def warmed_addition_model(tmp_path_factory):
    """tiny_model's twin warmed up for 60 steps on `a+b=` (rl.demo.tiny.warm_up_partial), built once:
    right on a few prompts in ten, so rewards vary within groups and every step has a gradient.
    Tests write their own training rows (rl.demo.tiny.addition_rows)."""
    from rl.demo.tiny import build_model, warm_up_partial

    model = build_model(tmp_path_factory.mktemp("warmed_addition") / "model", arch="qwen3", tied=True)
    warm_up_partial(model, steps=60)
    yield from _shared_model(model)
