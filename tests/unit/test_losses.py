"""GRPO loss math against a plain, loop-by-loop reference written here."""
import dataclasses

import pytest
import torch

from rl.algorithms import losses
from rl.core import kernels
from rl.algorithms.grpo import GRPO
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.config import RunConfig


def reference_grpo_loss(logits, tokens, lens, advantages, old_lp, ref_lp, cfg):
    """Loops over sequences and tokens; log-softmax by hand; the aggregation written out."""
    seq_losses, all_token_losses = [], []
    for i, n in enumerate(lens):
        token_losses = []
        for t in range(n):
            row = logits[i, t]
            logp = row[tokens[i, t]] - torch.log(torch.exp(row - row.max()).sum()) - row.max()
            ratio = torch.exp(logp - old_lp[i][t])
            a = advantages[i]
            lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
            surrogate = -torch.min(ratio * a, torch.clamp(ratio, lo, hi) * a)
            d = logp - ref_lp[i][t]
            kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[cfg.kl_kind]
            token_losses.append(surrogate + cfg.kl_coef * kl)
        seq_losses.append(token_losses)
        all_token_losses += token_losses
    if cfg.loss_agg == "token_mean":
        return sum(all_token_losses) / len(all_token_losses)
    if cfg.loss_agg == "seq_mean_token_mean":
        return sum(sum(s) / len(s) for s in seq_losses) / len(seq_losses)
    return sum(all_token_losses) / cfg.loss_constant


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "sum_constant"])
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_grpo_loss_and_gradient_match_reference(agg, kl_kind):
    torch.manual_seed(0)
    cfg = RunConfig(grpo={"loss_agg": agg, "kl_kind": kl_kind, "kl_coef": 0.1, "loss_constant": 37.0,
                          "group_size": 2, "clip_low": 0.2, "clip_high": 0.28})
    algo = GRPO(cfg)
    lens, vocab = [5, 2, 7, 3], 11
    prompt = [1, 2, 3]
    input_ids = [prompt + torch.randint(0, vocab, (n,)).tolist() for n in lens]
    advantages = [0.75, -0.75, 1.25, -1.25]  # exact in float32, like the stored fields
    # Old and reference logprobs far enough from the current ones that some ratios clip.
    old = [(torch.randn(n) * 0.5 - 2.0).tolist() for n in lens]
    ref = [(torch.randn(n) * 0.5 - 2.0).tolist() for n in lens]
    batch = SequenceBatch(
        input_ids=input_ids,
        prompt_lens=[len(prompt)] * 4,
        token_fields={"advantages": [[a] * n for a, n in zip(advantages, lens)], "old_logprobs": old,
                      "ref_logprobs": ref},
        loss_normalizer=losses.step_normalizer(lens, agg, 37.0),
    )
    mb = MicroBatch.from_sequences(batch)
    logits = torch.randn(4, max(lens), vocab, dtype=torch.float64, requires_grad=True)
    mb = dataclasses.replace(mb, token_fields={k: v.double() for k, v in mb.token_fields.items()},
                             completion_mask=mb.completion_mask.double())
    # An identity output layer makes the hidden states the logits themselves.
    loss, metrics = algo.loss(PolicyOutputs(hidden=logits, lm_head_weight=torch.eye(vocab, dtype=torch.float64)), mb)
    loss.backward()
    grad = logits.grad.clone()

    logits_ref = logits.detach().clone().requires_grad_(True)
    expected = reference_grpo_loss(logits_ref, mb.completion_ids, lens, advantages, old, ref, cfg.grpo)
    expected.backward()
    # PolicyOutputs.logits() computes in float32, the reference in float64.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grad, logits_ref.grad, atol=1e-6)
    # Padding positions get exactly zero gradient.
    assert grad[1, 2:].abs().max() == 0
    assert metrics["tokens"] == sum(lens)
    assert 0 < metrics["clip_fraction_sum"] < metrics["tokens"]  # the clipped branch is exercised


def test_micro_batches_sum_to_full_batch_loss():
    """Global normalisation: summing micro-batch losses equals the whole-batch loss."""
    torch.manual_seed(1)
    for agg in losses.AGGREGATIONS:
        values = torch.randn(6, 8)
        mask = torch.zeros(6, 8)
        for i, n in enumerate([8, 1, 3, 5, 2, 7]):
            mask[i, :n] = 1
        lens = mask.sum(1).int().tolist()
        # group_token_mean: groups of 3 sequences, so micro-batches of 2 split a group.
        weights = torch.tensor([row + [0.0] * (8 - len(row)) for row in losses.group_token_weights(
            [[1.0] * n for n in lens], [3, 3])]) if agg == "group_token_mean" else None
        norm = losses.step_normalizer(lens, agg, 50.0, groups=2)
        full = losses.aggregate(values, mask, agg, norm, weights)
        parts = sum(losses.aggregate(values[i : i + 2], mask[i : i + 2], agg, norm,
                                     None if weights is None else weights[i : i + 2]) for i in range(0, 6, 2))
        assert torch.allclose(full, parts, atol=1e-6)
        if agg == "group_token_mean":  # the mean over groups of each group's token mean
            group_means = [(values[g] * mask[g]).sum() / mask[g].sum() for g in (slice(0, 3), slice(3, 6))]
            assert torch.allclose(full, sum(group_means) / 2, atol=1e-6)
        # A per-micro-batch mean (the bug) differs for unequal lengths.
        if agg == "token_mean":
            buggy = sum((values[i : i + 2] * mask[i : i + 2]).sum() / mask[i : i + 2].sum() for i in range(0, 6, 2)) / 3
            assert not torch.allclose(full, buggy, atol=1e-3)



def test_zero_advantage_fraction_counts_all_equal_groups():
    from rl.algorithms import Rollouts
    from rl.core.types import Completion

    cfg = RunConfig(grpo={"group_size": 2})
    algo = GRPO(cfg)
    comp = lambda: Completion([1], [2, 3], "x", [-1.0, -1.0], "stop")  # noqa: E731
    rollouts = Rollouts(rows=[{}, {}, {}], prompt_ids=[[1]] * 3, completions=[[comp(), comp()] for _ in range(3)],
                        rewards=[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    batch, metrics = algo.build_batch(rollouts)
    assert metrics["zero_advantage_fraction"] == pytest.approx(2 / 3)
    assert batch.token_fields["advantages"][2] == [-0.5, -0.5]
    assert batch.loss_normalizer == 12  # token_mean: 6 completions x 2 tokens


def test_token_logprobs_against_softmax():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    p = torch.softmax(logits, -1)
    assert torch.allclose(kernels.token_logprobs(logits, tokens), p.log().gather(-1, tokens[..., None])[..., 0], atol=1e-6)
