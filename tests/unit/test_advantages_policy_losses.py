"""The advantage and policy-loss registries against plain, loop-by-loop references written here."""
import math
import pickle

import pytest
import torch

from rl.algorithms import advantages, build_algorithm, policy_losses
from rl.config import load_config

REWARDS = [1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 0.5, 1.0]  # two groups of 4


def _groups(g=4):
    return [REWARDS[i : i + g] for i in range(0, len(REWARDS), g)]


def test_group_mean_and_group_mean_std():
    mean_only = advantages.get_advantage("group_mean")(torch.tensor(REWARDS), 4)
    with_std = advantages.get_advantage("group_mean_std")(torch.tensor(REWARDS), 4)
    for g, group in enumerate(_groups()):
        mean = sum(group) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 3)  # unbiased, as torch.std
        for j, r in enumerate(group):
            assert mean_only[4 * g + j].item() == pytest.approx(r - mean, abs=1e-6)
            assert with_std[4 * g + j].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-6)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    got = advantages.get_advantage("rloo")(torch.tensor(REWARDS), 4)
    for g, group in enumerate(_groups()):
        for j, r in enumerate(group):
            others = [x for k, x in enumerate(group) if k != j]
            assert got[4 * g + j].item() == pytest.approx(r - sum(others) / len(others), abs=1e-6)
    # The leave-one-out baseline is G/(G-1) times the group-mean advantage: not the same numbers.
    assert not torch.allclose(got, advantages.group_mean(torch.tensor(REWARDS), 4))
    with pytest.raises(ValueError, match="group_size >= 2"):
        advantages.rloo(torch.tensor([1.0, 0.0]), 1)


def test_gspo_is_one_clipped_ratio_per_sequence():
    torch.manual_seed(0)
    lens, clip_low, clip_high = [3, 1, 4], 0.1, 0.15
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in lens])
    old = (torch.randn(3, 4) * 0.3 - 1.5) * mask
    logp = (old + torch.randn(3, 4) * 0.3).requires_grad_(True)
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4, [0.5] * 4])
    per_token, clipped = policy_losses.get_policy_loss("gspo")(logp, old, adv, mask, clip_low, clip_high)
    (per_token * mask).sum().backward()

    ref_logp = logp.detach().clone().requires_grad_(True)
    total, ref_clipped = 0.0, []
    for i, n in enumerate(lens):
        ratio = torch.exp(sum(ref_logp[i, t] - old[i, t] for t in range(n)) / n)  # GSPO's s_i
        a = adv[i, 0]
        term = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
        ref_clipped.append(bool(torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a < ratio * a))
        for t in range(n):
            assert per_token[i, t].item() == pytest.approx(term.item(), rel=1e-5)  # every token: the sequence's term
        total = total + n * term
    total.backward()
    assert torch.allclose(logp.grad, ref_logp.grad, atol=1e-6)
    assert [bool(clipped[i, 0]) for i in range(3)] == ref_clipped
    assert 0 < sum(ref_clipped) < 3  # both branches of the clip are exercised


def test_ppo_clip_is_one_clipped_ratio_per_token():
    logp = torch.tensor([[-1.0, -0.5]])
    old = torch.tensor([[-1.5, -0.5]])
    per_token, clipped = policy_losses.ppo_clip(logp, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2, 0.28)
    assert per_token[0].tolist() == pytest.approx([-1.28, -1.0])  # exp(0.5) = 1.65 clipped to 1.28; ratio 1
    assert clipped.tolist() == [[1.0, 0.0]]


def test_the_algorithm_composes_the_named_estimator_and_loss():
    from rl.algorithms.base import Rollouts
    from rl.core.types import Completion

    algo = build_algorithm(load_config(None, ["grpo.group_size=4", "grpo.advantage=rloo", "grpo.policy_loss=gspo"]))
    assert algo.loss.policy_loss is policy_losses.gspo
    completions = [[Completion([1], [5, 6], "", [-1.0, -1.0], "stop") for _ in range(4)] for _ in range(2)]
    batch, _ = algo.build_batch(Rollouts([{}, {}], [[1], [1]], completions, _groups()))
    want = advantages.rloo(torch.tensor(REWARDS), 4).tolist()
    assert [row[0] for row in batch.token_fields["advantages"]] == pytest.approx(want)


def test_the_learner_gets_a_small_loss_spec_not_the_algorithm():
    class Tokenizer:  # stands for a real one: megabytes of vocabulary that must not travel each step
        vocab = list(range(200_000))

    for recipe in ("grpo_smollm2", "opsd_smollm2", "igpo_tiny"):
        algo = build_algorithm(load_config(recipe))
        algo.attach_tokenizer(Tokenizer())
        blob = pickle.dumps(algo.loss)
        assert len(blob) < 2000, (recipe, len(blob))
        assert pickle.loads(blob) == algo.loss  # a frozen dataclass of options: equal after the trip
