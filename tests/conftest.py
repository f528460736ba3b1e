import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; tests create and kill their own actors."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
