"""GRPO's practitioner options against plain reference computations written here."""
import math

import pytest
import torch

from rl.algorithms import losses
from rl.core import kernels
from rl.algorithms import Rollouts
from rl.algorithms.grpo import GRPO
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.config import RunConfig
from rl.loop.collect import collect_rollouts
from rl.core.types import Completion


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_token_logprobs_equal_naive_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (2, 5))
    got = kernels.chunked_token_logprobs(hidden, weight, tokens, temperature=0.7, chunk_size=chunk)
    (got * torch.arange(10.0).view(2, 5)).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive = torch.log_softmax((hidden @ weight.T) / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    (naive * torch.arange(10.0).view(2, 5)).sum().backward()
    assert torch.allclose(got, naive, atol=1e-6)
    assert torch.allclose(g_hidden, hidden.grad, atol=1e-5) and torch.allclose(g_weight, weight.grad, atol=1e-5)


def test_truncated_is_weights_reference():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tok = losses.truncated_is_weights(old, rollout, mask, "token", cap=2.0)
    seq = losses.truncated_is_weights(old, rollout, mask, "sequence", cap=2.0)
    for i in range(2):
        n = int(mask[i].sum())
        log_seq = sum(old[i, t].item() - rollout[i, t].item() for t in range(n))
        for t in range(3):
            want_tok = min(math.exp(old[i, t] - rollout[i, t]), 2.0) if t < n else 0.0
            want_seq = min(math.exp(log_seq), 2.0) if t < n else 0.0
            assert tok[i, t].item() == pytest.approx(want_tok, rel=1e-6)
            assert seq[i, t].item() == pytest.approx(want_seq, rel=1e-6)
    # The masked modes (TRL's token_mask / sequence_mask): the ratio below the cap, 0 above it.
    tok = losses.truncated_is_weights(old, rollout, mask, "token_mask", cap=2.0)
    seq = losses.truncated_is_weights(old, rollout, mask, "sequence_mask", cap=2.0)
    for i in range(2):
        n = int(mask[i].sum())
        r_seq = math.exp(sum(old[i, t].item() - rollout[i, t].item() for t in range(n)))
        for t in range(3):
            r = math.exp(old[i, t] - rollout[i, t])
            assert tok[i, t].item() == pytest.approx((r if r <= 2.0 else 0.0) if t < n else 0.0, rel=1e-6)
            assert seq[i, t].item() == pytest.approx((r_seq if r_seq <= 2.0 else 0.0) if t < n else 0.0, rel=1e-6)
    assert (tok == 0).any() and (tok > 1).any()  # both sides of the cap are exercised


def test_worst_prompt_group_gap_against_a_plain_mean():
    """The gap of each prompt's group (one engine's rollouts) is its tokens' mean; the worst is reported."""
    algo = GRPO(RunConfig(grpo={"group_size": 2}))
    batch = SequenceBatch(input_ids=[[1, 2, 5, 6], [1, 2, 7], [3, 4, 8, 9], [3, 4, 9]], prompt_lens=[2, 2, 2, 2],
                          token_fields={"rollout_logprobs": [[-1.0, -1.0], [-1.0], [-2.0, -2.0], [-2.0]]})
    learner = [[-1.0, -1.1], [-1.0], [-1.0, -3.0], [-2.5]]  # group 1 is off by 1, 1 and 0.5
    _, metrics = algo.use_policy_scores(batch, learner, None)
    assert metrics["mismatch/logprob_gap_group_max"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["mismatch/logprob_gap_mean"] == pytest.approx((0.1 + 1 + 1 + 0.5) / 6)


@pytest.mark.parametrize("level", ["off", "token", "sequence_mask"])
def test_capped_fraction_counts_the_tokens_beyond_the_cap(level):
    """mismatch/is_capped_fraction: where the truncated importance weights act (ratio > cap), at the
    configured level, counted by hand here."""
    algo = GRPO(RunConfig(grpo={"group_size": 2, "importance_sampling": level, "importance_cap": 2.0}))
    batch = SequenceBatch(input_ids=[[1, 2, 5, 6], [1, 2, 7], [3, 4, 8, 9], [3, 4, 9]], prompt_lens=[2, 2, 2, 2],
                          token_fields={"rollout_logprobs": [[-1.0, -2.0], [-1.0], [-2.0, -2.0], [-2.0]]})
    learner = [[-0.2, -2.5], [-1.0], [-1.5, -1.5], [-3.0]]  # token ratios e^0.8, e^-0.5, 1, e^0.5, e^0.5, e^-1
    _, metrics = algo.use_policy_scores(batch, learner, None)
    if level == "sequence_mask":  # sequence ratios e^0.3, 1, e^1 (beyond 2: its 2 tokens), e^-1
        want = 2 / 6
    else:  # token ratios beyond 2: only e^0.8
        want = 1 / 6
    assert metrics["mismatch/is_capped_fraction"] == pytest.approx(want)


def _batch(algo, lens, advantages, rollout_lp, truncated=None):
    truncated = truncated or [False] * len(lens)
    comps = [Completion([1, 2], list(range(3, 3 + n)), "x", lp, "length" if tr else "stop")
             for n, lp, tr in zip(lens, rollout_lp, truncated)]
    g = algo.cfg.group_size
    rewards = [[a for a in advantages[i : i + g]] for i in range(0, len(lens), g)]
    rollouts = Rollouts([{}] * len(rewards), [[1, 2]] * len(rewards), [comps[i : i + g] for i in range(0, len(comps), g)], rewards)
    return algo.build_batch(rollouts)


def _reference_loss(logits, tokens, lens, adv, weights, keep):
    total, count = 0.0, 0
    for i, n in enumerate(lens):
        for t in range(n):
            logp = torch.log_softmax(logits[i, t], -1)[tokens[i, t]]
            ratio = torch.exp(logp - logp.detach())
            total = total + (-ratio * adv[i]) * weights[i][t] * keep[i][t]
            count += 1
    return total / count


@pytest.mark.parametrize("is_level", ["off", "token"])
def test_loss_with_entropy_mask_and_importance_weights_matches_reference(is_level):
    torch.manual_seed(1)
    cfg = RunConfig(grpo={"group_size": 2, "importance_sampling": is_level, "importance_cap": 1.5, "entropy_top_fraction": 0.5})
    algo = GRPO(cfg)
    lens = [3, 2, 4, 1]
    rollout_lp = [(torch.randn(n) - 2).tolist() for n in lens]
    batch, _ = _batch(algo, lens, [1.0, 0.0, 0.0, 1.0], rollout_lp)
    vocab = 7
    logits = torch.randn(4, 4, vocab, dtype=torch.float64, requires_grad=True)
    mb = MicroBatch.from_sequences(batch)
    with torch.no_grad():
        lp = torch.log_softmax(logits.float(), -1).gather(-1, mb.completion_ids[..., None])[..., 0]
        ent = -(torch.softmax(logits.float(), -1) * torch.log_softmax(logits.float(), -1)).sum(-1)
    scores = ([lp[i, :n].tolist() for i, n in enumerate(lens)], [ent[i, :n].tolist() for i, n in enumerate(lens)])
    batch, metrics = algo.use_policy_scores(batch, *scores)
    # The filter keeps exactly ceil(0.5 * 10) = 5 highest-entropy tokens of the whole batch.
    flat = sorted(((ent[i, t].item(), i, t) for i, n in enumerate(lens) for t in range(n)), reverse=True)
    top = {(i, t) for _, i, t in flat[:5]}
    assert {(i, t) for i, row in enumerate(batch.token_fields["pg_mask"]) for t, k in enumerate(row) if k} == top
    gaps = [abs(a - b) for i in range(4) for a, b in zip(scores[0][i], rollout_lp[i])]
    assert metrics["mismatch/logprob_gap_mean"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-5)

    mb = MicroBatch.from_sequences(batch)
    loss, _ = algo.loss(PolicyOutputs(hidden=logits, lm_head_weight=torch.eye(vocab, dtype=torch.float64)), mb)
    loss.backward()
    adv = [0.5, -0.5, -0.5, 0.5]
    weights = [[min(math.exp(scores[0][i][t] - rollout_lp[i][t]), 1.5) if is_level == "token" else 1.0
                for t in range(n)] for i, n in enumerate(lens)]
    keep = batch.token_fields["pg_mask"]
    ref_logits = logits.detach().clone().requires_grad_(True)
    expected = _reference_loss(ref_logits, mb.completion_ids, lens, adv, weights, keep)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-5)
    for i, n in enumerate(lens):  # filtered-out tokens get no policy-gradient at all
        for t in range(n):
            if not keep[i][t]:
                assert logits.grad[i, t].abs().max() == 0


def test_overlong_filter_leaves_truncated_completions_out_of_the_loss():
    algo = GRPO(RunConfig(grpo={"group_size": 2, "overlong_filter": True}))
    batch, metrics = _batch(algo, [3, 5, 2, 4], [1.0, 0.0, 1.0, 1.0], [[-1.0] * n for n in [3, 5, 2, 4]],
                            truncated=[False, True, False, False])
    assert batch.token_fields["loss_mask"][1] == [0.0] * 5 and batch.token_fields["loss_mask"][0] == [1.0] * 3
    assert batch.loss_normalizer == 3 + 2 + 4  # token-mean over the trained tokens only
    assert metrics["overlong_filtered_fraction"] == 0.25


class _FakePool:
    """Group i of every call gets completions whose text is its reward pattern."""

    def __init__(self, patterns):
        self.patterns, self.calls = iter(patterns), 0

    def generate(self, prompts, spec):
        self.calls += 1
        return [[Completion(p, [7] * 2, t, [-1.0, -1.0], "stop") for t in next(self.patterns)] for p in prompts]


class _TextScorer:
    def score(self, texts, rows, info=None):
        from rewards.scoring import ScoreResult

        totals = [float(t) for t in texts]
        return ScoreResult(totals=totals, parts={"math_verify": totals}, failures=[], correct=[t >= 1 for t in totals])


class _Stream:
    def __init__(self):
        self.position = 0

    def take(self, n):
        rows = [{"problem": f"q{self.position + i}", "answer": "1"} for i in range(n)]
        self.position += n
        return rows


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_dynamic_sampling_never_trains_on_an_all_equal_group():
    cfg = RunConfig(grpo={"group_size": 2, "dynamic_sampling": True, "max_sampling_rounds": 3},
                    train={"prompts_per_step": 3}, data={"prompt_format": "plain"})
    algo = GRPO(cfg)
    # Round 1: 3 prompts, one with signal; round 2: 2 prompts, both all-equal; round 3: 2, both with signal.
    patterns = [["1", "0"], ["0", "0"], ["1", "1"], ["0", "0"], ["1", "1"], ["0", "1"], ["1", "0"]]
    pool = _FakePool(iter(patterns))
    out = collect_rollouts(_Stream(), pool, _TextScorer(), algo, algo.sampling_spec(), cfg, _Tok())
    assert out.rounds == 3 and pool.calls == 3
    assert [r["problem"] for r in out.rollouts.rows] == ["q0", "q5", "q6"]
    assert all(max(r) > min(r) for r in out.rollouts.rewards)
    assert len(out.generated) == 2 * 7  # every generated completion counts, dropped groups included
    batch, metrics = algo.build_batch(out.rollouts)
    assert metrics["zero_advantage_fraction"] == 0.0

    # Without dynamic sampling, all-equal groups are kept (and counted as zero-advantage).
    cfg_off = RunConfig(grpo={"group_size": 2}, train={"prompts_per_step": 3}, data={"prompt_format": "plain"})
    algo_off = GRPO(cfg_off)
    out = collect_rollouts(_Stream(), _FakePool(iter(patterns)), _TextScorer(), algo_off, algo_off.sampling_spec(), cfg_off, _Tok())
    assert out.rounds == 1 and len(out.rollouts.rows) == 3


def test_sequence_level_ratio_loss_matches_reference():
    """policy_loss=gspo: one ratio per sequence, exp(mean token log-ratio), clipped as a whole."""
    torch.manual_seed(3)
    cfg = RunConfig(grpo={"group_size": 2, "policy_loss": "gspo", "updates_per_batch": 2, "clip_low": 0.1, "clip_high": 0.1})
    algo = GRPO(cfg)
    lens = [3, 2, 4, 1]
    batch, _ = _batch(algo, lens, [1.0, 0.0, 0.0, 1.0], [[-1.0] * n for n in lens])
    old = [(torch.randn(n) * 0.3 - 1.5).tolist() for n in lens]  # stale enough that some ratios clip
    batch, _ = algo.use_policy_scores(batch, old, None)
    vocab = 7
    logits = torch.randn(4, 4, vocab, dtype=torch.float64, requires_grad=True)
    mb = MicroBatch.from_sequences(batch)
    loss, metrics = algo.loss(PolicyOutputs(hidden=logits, lm_head_weight=None), mb)
    loss.backward()

    ref_logits = logits.detach().clone().requires_grad_(True)
    adv, total, clipped_seqs = [0.5, -0.5, -0.5, 0.5], 0.0, 0
    for i, n in enumerate(lens):
        logp = [torch.log_softmax(ref_logits[i, t], -1)[mb.completion_ids[i, t]] for t in range(n)]
        ratio = torch.exp(sum(lp - o for lp, o in zip(logp, old[i])) / n)
        clipped = torch.clamp(ratio, 0.9, 1.1)
        clipped_seqs += int(clipped.item() * adv[i] < ratio.item() * adv[i])
        total = total + n * -torch.minimum(ratio * adv[i], clipped * adv[i])  # every token carries the sequence's term
    expected = total / sum(lens)
    expected.backward()
    assert 0 < clipped_seqs < 4  # both branches of the clip are exercised
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)


def test_the_loop_sums_repair_counts_over_the_sampling_rounds():
    """Counts come back from repair_groups and are summed by the loop, round by round (no state kept
    by the algorithm): diffu-GRPO counts every sampled group, kept or dropped."""
    from rl.algorithms.diffu_grpo import DiffuGRPO

    cfg = RunConfig(algorithm="diffu_grpo", model={"kind": "masked_diffusion"}, rollout={"engine": "diffusion"},
                    diffu_grpo={"group_size": 2, "dynamic_sampling": True, "max_sampling_rounds": 3},
                    train={"prompts_per_step": 3}, data={"prompt_format": "plain"})
    algo = DiffuGRPO(cfg)
    patterns = [["1", "0"], ["0", "0"], ["1", "1"], ["0", "0"], ["1", "1"], ["0", "1"], ["1", "0"]]
    out = collect_rollouts(_Stream(), _FakePool(iter(patterns)), _TextScorer(), algo, algo.sampling_spec(), cfg, _Tok())
    assert out.rounds == 3
    assert out.rollouts.repair_counts["groups"] == 7 and out.rollouts.repair_counts["all_wrong_before"] == 2
    _, metrics = algo.build_batch(out.rollouts)
    assert metrics["igpo/all_wrong_fraction_before"] == pytest.approx(2 / 7)
