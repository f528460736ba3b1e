"""The names the training loop relies on, in one place: token fields an algorithm's batches may
carry and metrics it may report, and which check of the loop reads each. An algorithm says which
it provides (`Algorithm.provides`); the launch names every check that will not run without them."""
from __future__ import annotations

ADVANTAGES = "advantages"  # token field: the policy-gradient weight of each completion token
LOSS_MASK = "loss_mask"  # token field: 1 where the token is trained, 0 where it is left out
ENTROPY = "entropy"  # metric: mean policy entropy per trained token (a loss reports `entropy_sum`)
LOGPROB_GAP = "mismatch/logprob_gap_mean"  # metric: mean |learner - engine| log-prob of the sampled tokens
LOGPROB_GAP_MAX = "mismatch/logprob_gap_max"
LOGPROB_GAP_GROUP = "mismatch/logprob_gap_group_max"  # the worst prompt group's mean (one engine's)

CHECKS = {
    ENTROPY: "the entropy-collapse guard (train.stop_on_collapse) cannot see the policy turn uniform",
    ADVANTAGES: "the dead-weights guard (a zero gradient norm although advantages are not zero) does not run",
    LOGPROB_GAP: "the free weight-sync check from the next step's rollouts does not run; every push is re-scored "
    "on the engines instead (sync.check_sequences)",
}


def unchecked(provided: set[str]) -> list[str]:
    """One line per check of the loop that will not run for an algorithm providing `provided`."""
    return [f"`{name}` is not reported, so {what}" for name, what in CHECKS.items() if name not in provided]
