"""The even split shared by the rollout pool and the learner group (rl.core.actors.even_bounds)."""
import pytest

from rl.core.actors import even_bounds


def test_even_bounds_examples():
    assert even_bounds(5, 2) == [(0, 3), (3, 5)]
    assert even_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]  # empty parts at the end
    assert even_bounds(0, 2) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("n", range(0, 23))
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_even_bounds_cover_everything_once_and_balance(n, parts):
    bounds = even_bounds(n, parts)
    # Independent reference: deal the items round-robin, then count each part's share.
    sizes = [len(range(i, n, parts)) for i in range(parts)]
    assert [hi - lo for lo, hi in bounds] == sizes
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))  # contiguous, in order
