"""The masked-diffusion sampler and one-step estimator against plain loop implementations."""
from __future__ import annotations

import math

import pytest
import torch

from rollouts.diffusion import answer_layout, diffusion_sample, one_step_logprobs, steps_budget

V, MASK, PAD = 12, 11, 0


class ToyBidirectional:
    """Logits at each position depend on its own token, its position and the mean of every
    attended token: a deterministic stand-in for a bidirectional model. Records every input."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 8, generator=g)
        self.pos = torch.randn(64, 8, generator=g)
        self.out = torch.randn(8, V, generator=g) * 2
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.clone())
        e = self.emb[ids] * attention[..., None]
        context = e.sum(1, keepdim=True) / attention.sum(1, keepdim=True)[..., None]
        return (e + context + self.pos[: ids.shape[1]]) @ self.out


def reference_budget(n: int, steps: int) -> list[int]:
    """LLaDA's schedule written out: n // steps per step, the first n % steps steps one more."""
    return [n // steps + (1 if s < n % steps else 0) for s in range(steps)]


def reference_greedy(model, prompt, gen_length, block_length, steps, hint=None):
    """One row, T=0, low-confidence remasking, with Python loops and lists only."""
    hint = hint or {}
    answer = [hint.get(j, MASK) for j in range(gen_length)]
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        block = range(b * block_length, (b + 1) * block_length)
        budget = reference_budget(sum(answer[j] == MASK for j in block), per_block)
        for s in range(per_block):
            ids = torch.tensor([prompt + answer])
            logits = model(ids, torch.ones_like(ids))[0, len(prompt):]
            candidates = []
            for j in block:
                if answer[j] == MASK:
                    probs = torch.softmax(logits[j].float(), -1)
                    token = int(probs.argmax())
                    candidates.append((-float(probs[token]), j, token))
            for _, j, token in sorted(candidates)[: budget[s]]:
                answer[j] = token
    return answer


def test_steps_budget_matches_the_schedule():
    counts = torch.tensor([0, 1, 7, 8, 13, 32])
    for steps in (1, 3, 4, 8):
        got = steps_budget(counts, steps)
        for row, n in zip(got.tolist(), counts.tolist()):
            assert row == reference_budget(n, steps)
            assert sum(row) == n


@pytest.mark.parametrize("gen_length,block_length,steps", [(8, 8, 4), (12, 4, 6), (16, 4, 16), (12, 6, 2)])
def test_greedy_sampler_equals_a_loop_reference(gen_length, block_length, steps):
    prompts = [[3, 4, 5], [1, 2], [6, 7, 8, 9, 10]]
    hints = [{}, {1: 7, 2: 8}, {0: 9, gen_length - 1: 4}]
    model = ToyBidirectional()
    got = diffusion_sample(model, prompts, mask_id=MASK, pad_id=PAD, gen_length=gen_length,
                           block_length=block_length, steps=steps, temperature=0.0, hints=hints)
    # Batched rows are right-padded: the padding is outside the attention, so each row must equal
    # its own unbatched loop.
    for i, (prompt, hint) in enumerate(zip(prompts, hints)):
        assert got.tokens[i].tolist() == reference_greedy(model, prompt, gen_length, block_length, steps, hint)
    assert (got.tokens != MASK).all()


def test_committed_counts_per_step_and_block():
    gen_length, block_length, steps = 12, 4, 6  # 3 blocks of 2 steps
    hints = [{}, {0: 5, 1: 5, 2: 5}, {4: 1, 9: 2, 10: 3}]
    got = diffusion_sample(ToyBidirectional(), [[1], [2], [3]], mask_id=MASK, pad_id=PAD, gen_length=gen_length,
                           block_length=block_length, steps=steps, temperature=1.0, hints=hints,
                           generator=torch.Generator().manual_seed(0))
    for i, hint in enumerate(hints):
        expected = []
        for b in range(3):
            free = sum(1 for j in range(b * 4, b * 4 + 4) if j not in hint)
            expected += reference_budget(free, 2)
        assert got.committed[i].tolist() == expected
        assert got.committed[i].sum() == gen_length - len(hint)


def test_hints_never_change_and_later_blocks_wait():
    gen_length, block_length, steps = 12, 4, 6
    prompts, hints = [[1, 2], [3]], [{0: 7, 5: 8, 11: 9}, {3: 4}]
    model = ToyBidirectional()
    got = diffusion_sample(model, prompts, mask_id=MASK, pad_id=PAD, gen_length=gen_length,
                           block_length=block_length, steps=steps, temperature=1.5, remasking="random",
                           hints=hints, generator=torch.Generator().manual_seed(3))
    _, _, positions = answer_layout(prompts, gen_length, PAD, MASK)
    assert len(model.calls) == steps
    for call, ids in enumerate(model.calls):
        block = call // 2
        answers = ids[torch.arange(2)[:, None], positions]
        for i, hint in enumerate(hints):
            for pos, token in hint.items():
                assert answers[i, pos] == token  # fixed from the first call on
            later = [j for j in range((block + 1) * 4, gen_length) if j not in hint]
            assert (answers[i, later] == MASK).all()  # no block commits ahead of its turn
    for i, hint in enumerate(hints):
        assert all(got.tokens[i, pos] == token for pos, token in hint.items())
        assert got.hint_mask[i].nonzero().flatten().tolist() == sorted(hint)


def test_greedy_is_deterministic_and_sampling_follows_the_seed():
    kwargs = dict(mask_id=MASK, pad_id=PAD, gen_length=8, block_length=4, steps=4)
    prompts = [[1, 2, 3]] * 4
    a = diffusion_sample(ToyBidirectional(), prompts, temperature=0.0, generator=torch.Generator().manual_seed(1), **kwargs)
    b = diffusion_sample(ToyBidirectional(), prompts, temperature=0.0, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    s1 = diffusion_sample(ToyBidirectional(), prompts, temperature=2.0, generator=torch.Generator().manual_seed(5), **kwargs)
    s2 = diffusion_sample(ToyBidirectional(), prompts, temperature=2.0, generator=torch.Generator().manual_seed(5), **kwargs)
    s3 = diffusion_sample(ToyBidirectional(), prompts, temperature=2.0, generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(s1.tokens, s2.tokens)
    assert not torch.equal(s1.tokens, s3.tokens)


def test_gumbel_temperature_samples_softmax_of_scaled_logits():
    """One block, one step, one answer position: the committed token is a draw from softmax(logits / T)."""
    model = ToyBidirectional(seed=4)
    n, temperature = 4000, 1.7
    got = diffusion_sample(model, [[2, 3]] * n, mask_id=MASK, pad_id=PAD, gen_length=1, block_length=1,
                           steps=1, temperature=temperature, generator=torch.Generator().manual_seed(0))
    logits = model(torch.tensor([[2, 3, MASK]]), torch.ones(1, 3, dtype=torch.long))[0, 2]
    expected = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(got.tokens[:, 0], minlength=V).float() / n
    # Every frequency within 4.5 binomial standard deviations of its probability.
    assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3).all()


def test_schedule_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of the block length"):
        diffusion_sample(ToyBidirectional(), [[1]], mask_id=MASK, pad_id=PAD, gen_length=10, block_length=4,
                         steps=4, temperature=0.0)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        diffusion_sample(ToyBidirectional(), [[1]], mask_id=MASK, pad_id=PAD, gen_length=8, block_length=4,
                         steps=3, temperature=0.0)


def test_one_step_estimator_equals_a_loop():
    model = ToyBidirectional(seed=2)
    prompts, answers = [[1, 2, 3], [4]], [[5, 6, 7, 8], [9, 1, 2, 3]]
    ids, attention, positions = answer_layout(prompts, 4, PAD, MASK)
    got = one_step_logprobs(model(ids, attention), positions, torch.tensor(answers), temperature=0.7)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        row = torch.tensor([prompt + [MASK] * 4])
        logits = model(row, torch.ones_like(row))[0]
        for k, token in enumerate(answer):
            z = logits[len(prompt) + k] / 0.7
            expected = float(z[token]) - math.log(float(torch.exp(z).sum()))
            assert got[i, k].item() == pytest.approx(expected, abs=1e-5)
