"""The reward worker pool: hard timeouts, crashes, errors, and exact attribution by index."""
import time

import pytest

import rewards
from rewards.pool import RewardPool, Task, WorkerStartError
from rewards.scoring import RewardError, RewardScorer

FIXTURE = "tests/fixtures/custom_reward.py"


@rewards.register_reward("test_pool_length_times_two")
def length_times_two(completion: str, **row) -> float:
    return 2.0 * len(completion)


def _batch(n, flagged):
    texts = [f"completion {i} " + "x" * (i % 7) for i in range(n)]
    rows = [{"question": f"q{i}", "answer": str(i), "flag": i in flagged} for i in range(n)]
    return texts, rows


@pytest.fixture(scope="module")
def sleepy_scorer():
    scorer = RewardScorer([(f"{FIXTURE}:sleep_on_flag", 1.0), ("test_pool_length_times_two", 0.5)], workers=2, timeout_s=1.0)
    yield scorer
    scorer.close()


def test_hung_reward_is_killed_scored_zero_and_counted(sleepy_scorer):
    flagged = {3, 17, 18, 40}
    texts, rows = _batch(50, flagged)
    start = time.monotonic()
    result = sleepy_scorer.score(texts, rows)
    elapsed = time.monotonic() - start
    # Every other score is present and belongs to its own completion.
    expected = [(0.0 if i in flagged else len(t)) + 0.5 * 2.0 * len(t) for i, t in enumerate(texts)]
    assert result.totals == pytest.approx(expected)
    assert result.parts["sleep_on_flag"] == [0.0 if i in flagged else float(len(t)) for i, t in enumerate(texts)]
    assert sorted((f.index, f.kind, f.reward, f.completion, f.row["question"]) for f in result.failures) == [
        (i, "timeout", f"{FIXTURE}:sleep_on_flag", texts[i], f"q{i}") for i in sorted(flagged)
    ]
    assert result.counts == {"reward_timeouts": 4, "reward_errors_scored_zero": 0}
    assert "reward.timeout_s=1" in result.failures[0].message
    assert elapsed < 4 * 1.0 + 15  # killed at the deadline, not left to hang
    assert sleepy_scorer.pool.restarts >= 4 and len(sleepy_scorer.pool._workers) == 2


def test_pool_is_reusable_after_kills(sleepy_scorer):
    texts, rows = _batch(9, flagged=set())
    result = sleepy_scorer.score(texts, rows)
    assert result.totals == pytest.approx([2.0 * len(t) for t in texts]) and not result.failures


def test_math_verify_hang_is_a_counted_timeout_in_the_pool():
    # sympy evaluates this power tower exactly: with its signal timeout off, math-verify hangs.
    texts = ["\\boxed{4}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{5}"]
    with RewardScorer([("math_verify", 1.0)], workers=1, timeout_s=2.0) as scorer:
        result = scorer.score(texts, [{"answer": "4"}, {"answer": "1"}, {"answer": "5"}])
    assert result.totals == [1.0, 0.0, 1.0]
    assert [(f.index, f.kind) for f in result.failures] == [(1, "timeout")]


@pytest.mark.parametrize("fn,match", [
    ("raise_on_flag", "raised ZeroDivisionError: flagged row 'q5'"),
    ("nan_on_flag", "returned nan, not a finite number"),
    ("exit_on_flag", r"worker process died \(exit code 3\)"),
])
def test_errors_in_workers_stop_with_the_right_completion(fn, match):
    texts, rows = _batch(12, flagged={5, 9})
    with RewardScorer([(f"{FIXTURE}:{fn}", 1.0)], workers=2, timeout_s=5.0) as scorer:
        with pytest.raises(RewardError, match=match) as err:
            scorer.score(texts, rows)
        assert f"completion 5: {texts[5]!r}" in str(err.value) and "'question': 'q5'" in str(err.value)
        # The pool stays consistent: the next batch scores normally.
        clean_texts, clean_rows = _batch(4, flagged=set())
        assert scorer.score(clean_texts, clean_rows).totals == [float(len(t)) for t in clean_texts]


@pytest.mark.parametrize("fn", ["raise_on_flag", "nan_on_flag", "exit_on_flag"])
def test_on_error_zero_in_workers(fn):
    texts, rows = _batch(30, flagged={0, 11, 29})
    with RewardScorer([(f"{FIXTURE}:{fn}", 1.0), ("test_pool_length_times_two", 1.0)], workers=2, on_error="zero") as s:
        result = s.score(texts, rows)
    assert result.parts[fn] == [0.0 if i in (0, 11, 29) else float(len(t)) for i, t in enumerate(texts)]
    assert result.parts["test_pool_length_times_two"] == [2.0 * len(t) for t in texts]
    assert [f.index for f in result.failures] == [0, 11, 29] and all(f.kind == "error" for f in result.failures)
    assert result.counts["reward_errors_scored_zero"] == 3


def test_module_references_and_dict_rewards_resolve_in_workers():
    texts = ["\\boxed{3}", "\\boxed{4}", "x" * 500]
    rows = [{"answer": "3"}, {"answer": "3"}, {"answer": "3"}]
    refs = [("tests.fixtures.custom_reward:short_and_right", 1.0), ("rewards.math:boxed_format_reward", 1.0)]
    with RewardScorer(refs, workers=1) as pooled:
        got = pooled.score(texts, rows)
    inline = RewardScorer(refs).score(texts, rows)
    assert got.parts == inline.parts == {
        "correct": [1.0, 0.0, 0.0], "brevity": [0.1, 0.1, 0.0], "boxed_format_reward": [1.0, 1.0, 0.0]
    }
    assert got.totals == inline.totals


def test_interrupted_batch_leaves_no_stale_results(monkeypatch):
    import rewards.pool

    texts, rows = _batch(40, flagged=set())
    with RewardScorer([(f"{FIXTURE}:slow_length", 1.0)], workers=2) as scorer:
        real_wait, calls = rewards.pool.wait, []

        def interrupted_wait(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:  # workers ready, chunks in flight
                raise KeyboardInterrupt
            return real_wait(*args, **kwargs)

        monkeypatch.setattr(rewards.pool, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt, match="^$"):  # ours, raised bare: not some other interrupt
            scorer.score(texts, rows)
        monkeypatch.setattr(rewards.pool, "wait", real_wait)
        fresh = [t + " again" for t in texts]
        assert scorer.score(fresh, rows).totals == [float(len(t)) for t in fresh]


def test_worker_that_cannot_load_the_reward_is_a_clear_error():
    pool = RewardPool(["no_such_module_anywhere:f"], workers=1, timeout_s=1.0)
    try:
        with pytest.raises(WorkerStartError, match="no_such_module_anywhere"):
            pool.run([Task(0, "x", {})])
    finally:
        pool.close()


def test_close_ends_every_worker_process():
    scorer = RewardScorer([("boxed_format", 1.0)], workers=2)
    assert scorer.score(["\\boxed{1}"], [{}]).totals == [1.0]
    processes = [w.process for w in scorer.pool._workers]
    scorer.close()
    assert len(processes) == 2 and not any(p.is_alive() for p in processes)
