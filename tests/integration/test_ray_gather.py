"""rl.core.actors.gather, the fail-fast ray.get of the rollout pool and the learner group, on real Ray tasks."""
import time

import pytest


class GatherError(RuntimeError):
    pass


@pytest.fixture
def tasks(ray_session):
    """Ray tasks (sleep_then, fail), defined here so that they travel by value: Ray workers cannot
    import this test module."""
    import ray

    def sleep_then(seconds, value):
        time.sleep(seconds)
        return value

    def fail(message):
        raise ValueError(message)

    return ray.remote(num_cpus=0)(sleep_then), ray.remote(num_cpus=0)(fail)


def test_results_come_back_in_order(tasks):
    from rl.core.actors import gather

    sleep_then, _ = tasks
    refs = [sleep_then.remote(0.6 - 0.2 * i, i) for i in range(3)]  # the last finishes first
    assert gather(refs, "run", lambda i: f"worker {i}", GatherError) == [0, 1, 2]


def test_the_first_failure_raises_at_once_naming_the_member(tasks):
    from rl.core.actors import gather

    sleep_then, fail = tasks
    refs = [sleep_then.remote(60, 0), fail.remote("bad input")]
    start = time.monotonic()
    with pytest.raises(GatherError, match=r"^worker 1 of 2 failed in train_step: ValueError: bad input"):
        gather(refs, "train_step", lambda i: f"worker {i} of 2", GatherError)
    assert time.monotonic() - start < 30  # not waiting for worker 0's minute


def test_members_that_do_not_answer_in_time_are_named(tasks):
    from rl.core.actors import gather

    sleep_then, _ = tasks
    refs = [sleep_then.remote(0, 0), sleep_then.remote(60, 1), sleep_then.remote(60, 2)]
    with pytest.raises(GatherError, match=r"^no answer to generate in 2 s from engine 1, engine 2$"):
        gather(refs, "generate", lambda i: f"engine {i}", GatherError, timeout_s=2)
