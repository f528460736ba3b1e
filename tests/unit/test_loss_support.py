"""IGPO's loss support, both rules: which answer positions are trained (through the first EOS, or
the whole answer as the IGPO release's masked_token_mask) and how the loss is aggregated (a token
mean over the step, or the releases' token mean per group averaged over the groups).

Numbers are checked against plain loops written here.
"""
import random

import pytest
import torch

from rl.algorithms import build_algorithm, losses
from rl.algorithms.base import Rollouts
from rl.config import load_config
from rl.core.batch import MicroBatch, PolicyOutputs
from rollouts.diffusion_engine import MaskedDiffusionEngine
from rl.core.types import Completion, SamplingSpec
from tests.unit.test_inpainting import CharTokenizer

G = 3
EOS = 99


def reference_group_token_mean(values, masks, group_size):
    """(1/groups) * sum_g [sum_{i in g, t} m * v / sum_{i in g, t} m], a loop over plain lists."""
    total, groups = 0.0, 0
    for start in range(0, len(values), group_size):
        num = den = 0.0
        for i in range(start, start + group_size):
            for v, m in zip(values[i], masks[i]):
                num += v * m
                den += m
        total += num / den if den else 0.0
        groups += 1
    return total / groups


def test_group_token_mean_equals_the_loop_and_splits_over_micro_batches():
    rng = random.Random(0)
    lens = [5, 2, 7, 4, 4, 1]  # two groups of 3
    values = [[rng.uniform(-2, 2) for _ in range(n)] for n in lens]
    masks = [[float(rng.random() < 0.7) for _ in range(n)] for n in lens]
    masks[4] = [0.0] * 4  # a sequence without loss tokens still belongs to its group
    expected = reference_group_token_mean(values, masks, G)
    # It is neither the step's token mean nor a mean of sequence means.
    flat_v = [v * m for row, mrow in zip(values, masks) for v, m in zip(row, mrow)]
    assert expected != pytest.approx(sum(flat_v) / sum(map(sum, masks)))

    weights = losses.group_token_weights(masks, [G, G])
    normalizer = losses.step_normalizer([], "group_token_mean", groups=2)

    def share(rows):
        width = max(lens[i] for i in rows)
        pad = lambda table: torch.tensor([table[i] + [0.0] * (width - lens[i]) for i in rows], dtype=torch.float64)
        return losses.aggregate(pad(values), pad(masks), "group_token_mean", normalizer, pad(weights))

    whole = share(range(6))
    assert whole.item() == pytest.approx(expected, rel=1e-12)
    # Micro-batches that cut through a group add up to the same step loss.
    split = share([0, 1]) + share([2, 3]) + share([4, 5])
    assert split.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="group weights"):
        losses.aggregate(torch.ones(1, 1), torch.ones(1, 1), "group_token_mean", 1.0)
    with pytest.raises(ValueError, match="number of groups"):
        losses.step_normalizer([3], "group_token_mean")


def algorithm(*overrides):
    cfg = load_config(None, [
        "algorithm=igpo", "model.kind=masked_diffusion", "rollout.engine=diffusion", f"igpo.group_size={G}",
        "rollout.max_tokens=12", "igpo.free_tail=2", "igpo.chunk_min=2", "igpo.chunk_max=3", *overrides,
    ])
    algo = build_algorithm(cfg)
    algo.attach_tokenizer(CharTokenizer())
    return algo


HINTS = [[False] * 6, [True, True, True, True, False, False, False, False], [False] * 3,
         [False] * 4, [False] * 5, [False, True, True, False, False]]
REWARDS = [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]


def rollouts():
    completions = [Completion([1, 2], list(range(10, 10 + len(h))), "", [-1.0] * len(h), "stop",
                              h if any(h) else None) for h in HINTS]
    rows = [{"problem": "q", "answer": "1"}] * 2
    return Rollouts(rows, [[1, 2]] * 2, [completions[:3], completions[3:]], REWARDS)


def loss_of(algo, batch, seed=0):
    """The algorithm's loss on the step's batch as one micro-batch, and the loop reference of its
    aggregation over the per-token values the loss computes (ratio 1, advantage per token)."""
    mb = MicroBatch.from_sequences(batch)
    vocab = 120
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(batch), mb.completion_ids.shape[1], vocab, generator=g)
    out = PolicyOutputs(hidden=logits, lm_head_weight=None, temperature=1.0)
    loss, _ = algo.loss(out, mb)
    # At ratio 1 without KL, each token's loss is -A (ppo_clip), so the reference is exact.
    values = [[-a for a in row] for row in batch.token_fields["advantages"]]
    return loss.item(), values


def test_token_mean_support_through_eos_is_unchanged():
    algo = algorithm()
    assert algo.cfg.loss_support == "through_eos" and algo.cfg.loss_agg == "token_mean"
    assert algo.sampling_spec().keep_after_eos is False
    batch, _ = algo.build_batch(rollouts())
    assert "loss_weight" not in batch.token_fields
    assert batch.loss_normalizer == sum(len(h) for h in HINTS)
    loss, values = loss_of(algo, batch)
    expected = sum(sum(row) for row in values) / sum(len(h) for h in HINTS)
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_group_token_mean_through_the_algorithm_and_after_the_hint_filter():
    algo = algorithm("igpo.loss_agg=group_token_mean", "igpo.loss_support=whole_answer", "igpo.hint_entropy_fraction=0.25")
    assert algo.sampling_spec().keep_after_eos is True
    batch, _ = algo.build_batch(rollouts())
    masks = batch.token_fields["loss_mask"]
    assert batch.loss_normalizer == 2.0
    loss, values = loss_of(algo, batch)
    assert loss == pytest.approx(reference_group_token_mean(values, masks, G), rel=1e-5, abs=1e-7)

    # The hint filter drops 3 of the 4 hint tokens of sequence 1 and 1 of the 2 of sequence 5: the
    # groups' weights follow.
    entropies = [[0.1 * (j + 1) for j in range(len(h))] for h in HINTS]
    batch, _ = algo.use_policy_scores(batch, [[-1.0] * len(h) for h in HINTS], entropies)
    masks = batch.token_fields["loss_mask"]
    assert masks[1] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert batch.token_fields["loss_weight"][0][0] == pytest.approx(1 / (6 + 5 + 3))
    assert batch.token_fields["loss_weight"][3][0] == pytest.approx(1 / (4 + 5 + 4))
    loss, values = loss_of(algo, batch)
    assert loss == pytest.approx(reference_group_token_mean(values, masks, G), rel=1e-5, abs=1e-7)


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def engine():
    e = MaskedDiffusionEngine.__new__(MaskedDiffusionEngine)
    e.tokenizer, e.eos_ids = _Tokenizer(), {EOS}
    return e


def test_the_engine_keeps_the_whole_answer_when_asked():
    tokens = [5, 6, EOS, 7, EOS, EOS]
    logprobs = [-0.1 * (j + 1) for j in range(6)]
    hint = [True, False, False, False, False, True]
    short = engine()._completion([1], tokens, logprobs, hint, SamplingSpec())
    assert (short.token_ids, short.logprobs, short.hint_mask) == ([5, 6, EOS], logprobs[:3], hint[:3])
    whole = engine()._completion([1], tokens, logprobs, hint, SamplingSpec(keep_after_eos=True))
    assert (whole.token_ids, whole.logprobs, whole.hint_mask) == (tokens, logprobs, hint)
    # The text (what the reward reads) and the finish reason stop at the first EOS either way.
    assert whole.text == short.text == "5 6" and whole.finish_reason == short.finish_reason == "stop"
    no_eos = engine()._completion([1], [5, 6, 7], [-1.0] * 3, None, SamplingSpec(keep_after_eos=True))
    assert no_eos.token_ids == [5, 6, 7] and no_eos.finish_reason == "length"


def test_gspo_ratio_spans_every_completion_token_not_only_the_loss_mask():
    """The IGPO release's sequence ratio sums log-ratios over all answer positions and divides by
    their number (trainer_igpo.py:655-658); tokens out of the loss (filtered hints) still count."""
    import math

    from rl.config import RunConfig
    from rl.algorithms.grpo import GRPO
    from rl.core.batch import SequenceBatch

    algo = GRPO(RunConfig(grpo={"group_size": 2, "policy_loss": "gspo", "updates_per_batch": 2,
                                "clip_low": 10.0, "clip_high": 10.0}))
    g = torch.Generator().manual_seed(1)
    lens, vocab = [4, 3], 7
    tokens = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    old = [(torch.randn(n, generator=g) * 0.3 - 2.0).tolist() for n in lens]
    loss_mask = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    adv = [1.0, -1.0]
    batch = SequenceBatch([[1] + t for t in tokens], [1, 1],
                          {"advantages": [[a] * n for a, n in zip(adv, lens)], "old_logprobs": old, "loss_mask": loss_mask},
                          loss_normalizer=5.0)
    logits = torch.randn(2, 4, vocab, generator=g)
    loss, _ = algo.loss(PolicyOutputs(hidden=logits, lm_head_weight=None, temperature=1.0), MicroBatch.from_sequences(batch))
    expected = 0.0
    for i, n in enumerate(lens):
        logp = [float(torch.log_softmax(logits[i, t], -1)[tokens[i][t]]) for t in range(n)]
        ratio = math.exp(sum(lp - o for lp, o in zip(logp, old[i])) / n)  # over all n positions
        expected += sum(-ratio * adv[i] * m for m in loss_mask[i])
    assert loss.item() == pytest.approx(expected / 5.0, rel=1e-5)
