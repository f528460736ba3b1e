"""Driving a set of Ray actors: the fail-fast gather and the even split of work, shared by the
rollout pool (one actor per engine) and the learner group (one actor per rank)."""
from __future__ import annotations

import time
from collections.abc import Callable


def even_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges over 0..n-1, one per part, whose sizes differ by at most one;
    the larger ones come first, so that empty ranges (n < parts) are all at the end."""
    size, extra = divmod(n, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + size + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def gather(
    refs: list,
    what: str,
    member: Callable[[int], str],
    error: type[Exception],
    timeout_s: float | None = None,
) -> list:
    """ray.get(refs) in order, failing fast: the first failed call raises `error` at once, naming
    the actor (`member(i)`, e.g. "learner rank 0 of 2") and the call `what`, without waiting for
    the others, which may be blocked in a collective with the failed one. With `timeout_s`, actors
    that have not answered by then are named the same way instead of stalling the caller."""
    import ray

    index_of = {ref: i for i, ref in enumerate(refs)}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            late = ", ".join(member(i) for i in sorted(index_of[r] for r in pending))
            raise error(f"no answer to {what} in {timeout_s} s from {late}")
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            raise error(f"{member(index_of[done[0]])} failed in {what}: {type(cause).__name__}: {cause}") from e
    return ray.get(refs)
