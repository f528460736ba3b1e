"""Which check covers each weight push (rl.sync.check.SyncCheck), with stand-ins for the engines and
the learner that return chosen log-probs: the next step's rollout gap where it measures the pushed
weights, re-scoring after the push everywhere else, and an error naming the gap either way."""
import pytest

from rl.config import load_config
from rl.core.batch import SequenceBatch
from rl.sync.check import SyncCheck, WeightSyncError

BATCH = SequenceBatch(input_ids=[[1, 2, 3, 4], [1, 2, 5]], prompt_lens=[2, 2])
LEARNER_LP = [[-1.0, -2.0], [-0.5]]


class Learners:
    def __init__(self):
        self.calls = 0

    def compute_logprobs(self, batch, temperature=1.0):
        self.calls += 1
        return LEARNER_LP[: len(batch)], None


class Pool:
    """Two engines; engine 1 is off by `shift` nats on every token."""

    def __init__(self, shift=0.0):
        self.shift = shift

    def score_each_engine(self, requests):
        return [LEARNER_LP[: len(requests)], [[x + self.shift for x in row] for row in LEARNER_LP[: len(requests)]]]


def sync_check(*overrides, shift=0.0):
    cfg = load_config("grpo_smollm2", ["train.steps=3", "sync.max_logprob_gap=0.01", *overrides])
    learners = Learners()
    return SyncCheck(cfg, Pool(shift), learners), learners


def gap(mean):
    return {"mismatch/logprob_gap_mean": mean, "mismatch/logprob_gap_max": 2 * mean}


def test_pushes_the_next_step_checks_are_not_rescored():
    check, learners = sync_check()
    assert check(1, BATCH, gap(1e-5), 0, evaluating=False) == {"logprob_gap": 1e-5, "logprob_gap_max": 2e-5}
    assert check(2, BATCH, gap(2e-5), 0, evaluating=False)["logprob_gap"] == 2e-5
    assert learners.calls == 0  # no forward spent on checks
    # The last step's push and one an evaluation uses at once have no next step to check them.
    check(3, BATCH, gap(1e-5), 0, evaluating=False)
    check(2, BATCH, gap(1e-5), 0, evaluating=True)
    assert learners.calls == 2


def test_a_rollout_gap_over_the_limit_stops_the_run():
    check, _ = sync_check()
    with pytest.raises(WeightSyncError, match=r"rollouts of step 2, .* by 0.5 nats per token .* sync.max_logprob_gap=0.01"):
        check(2, BATCH, gap(0.5), 0, evaluating=False)


def test_one_stale_engine_among_many_is_not_diluted():
    """Sixteen engines, one stale by 0.5 nats: the batch mean (0.03) passes the limit, the worst
    prompt group (one engine's) does not."""
    check, _ = sync_check("sync.max_logprob_gap=0.05")
    metrics = {**gap(0.5 / 16), "mismatch/logprob_gap_group_max": 0.5}
    with pytest.raises(WeightSyncError, match=r"by 0.5 nats per token on average over the worst prompt group \(all tokens: 0.0312"):
        check(2, BATCH, metrics, 0, evaluating=False)
    assert check(2, BATCH, {**gap(1e-5), "mismatch/logprob_gap_group_max": 3e-5}, 0, evaluating=False)["logprob_gap"] == 1e-5


# A cut distribution's gap, or one of a batch sampled before the last push (overlap), does not
# measure the engines' weights; with track_mismatch off there is none.
@pytest.mark.parametrize("override,batch_age", [("rollout.top_p=0.9", 0), ("rollout.top_k=20", 0),
                                                ("train.max_staleness=1", 1), ("grpo.track_mismatch=false", 0)])
def test_without_a_comparable_rollout_gap_every_push_is_rescored(override, batch_age):
    check, learners = sync_check(override)
    metrics = {} if override == "grpo.track_mismatch=false" else gap(0.5)
    for step in (1, 2, 3):
        assert check(step, BATCH, metrics, batch_age, evaluating=False) == {"logprob_gap": 0.0, "logprob_gap_max": 0.0}
    assert learners.calls == 3


def test_with_overlap_a_fresh_batch_still_checks():
    check, _ = sync_check("train.max_staleness=1")
    with pytest.raises(WeightSyncError, match="rollouts of step 1"):
        check(1, BATCH, gap(0.5), 0, evaluating=False)


def test_rescoring_names_the_engine_that_disagrees():
    check, _ = sync_check("rollout.top_p=0.9", shift=0.1)
    with pytest.raises(WeightSyncError, match=r"engine 1 disagrees with the learner by 0.1 nats"):
        check(1, BATCH, {}, 0, evaluating=False)


def test_check_sequences_zero_turns_every_check_off():
    check, learners = sync_check("sync.check_sequences=0", shift=1.0)
    assert check(3, BATCH, gap(0.5), 0, evaluating=False) == {} and learners.calls == 0


def test_the_rescored_window_is_the_prompts_end_and_the_completions_start():
    from rl.sync.check import check_window

    batch = SequenceBatch(input_ids=[list(range(10)), list(range(20, 25)), [7, 8, 9]], prompt_lens=[6, 3, 1])
    window = check_window(batch, 2, max_tokens=4)  # two sequences, at most 2 prompt tokens each
    assert window.input_ids == [[4, 5, 6, 7], [21, 22, 23, 24]] and window.prompt_lens == [2, 2]
    short = check_window(batch.select([2]), 1, max_tokens=4)  # a 1-token prompt keeps it and 3 more
    assert short.input_ids == [[7, 8, 9]] and short.prompt_lens == [1]
    whole = check_window(batch, 3, max_tokens=0)
    assert whole.input_ids == batch.input_ids and whole.prompt_lens == batch.prompt_lens


def test_causal_models_rescore_a_window_diffusion_models_whole_sequences():
    long = SequenceBatch(input_ids=[list(range(300))], prompt_lens=[200])
    check, learners = sync_check("train.max_staleness=1", "sync.check_tokens=16")
    seen = []
    learners.compute_logprobs = lambda batch, temperature=1.0: (seen.append(batch) or [[-1.0] * 8], None)
    check.pool.score_each_engine = lambda requests: [[[-1.0] * 8]] * 2
    check(1, long, {}, 1, evaluating=False)
    assert seen[-1].input_ids == [list(range(192, 208))] and seen[-1].prompt_lens == [8]
    diffusion = SyncCheck(load_config("igpo_tiny", ["sync.check_tokens=16"]), check.pool, learners)
    diffusion(1, long, {}, 0, evaluating=False)
    assert seen[-1].input_ids == long.input_ids
