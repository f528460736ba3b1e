"""GRPO.loss with loss_mask, sequence-level importance weights and temperature != 1, against a
plain loop-by-loop reference written here, in value and gradient.

`loss_mask` is what the overlong filter and IGPO's hint filter rely on to take tokens out of
the loss; the tests check the gradient (not just batch fields): a masked token moves nothing.
"""
import dataclasses
import math

import pytest
import torch

from rl.algorithms.grpo import GRPO
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.config import RunConfig

LENS = [5, 2, 6, 3]
VOCAB = 9
ADVANTAGES = [0.75, -0.75, 1.25, -1.25]
# Row 0 loses two tokens (a hint filter), row 1 is out entirely (an overlong completion), row 3 one.
LOSS_MASK = [[1, 0, 1, 0, 1], [0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0]]
CAP = 2.0


def is_weight(log_ratio, level):
    """Truncated (TIS) or masked (TRL's *_mask, MIS) importance weight of one ratio."""
    r = math.exp(log_ratio)
    return min(r, CAP) if level in ("token", "sequence") else (r if r <= CAP else 0.0)


def reference_loss(logits, tokens, old, rollout, ref, cfg, temperature):
    """Sum over sequences and tokens written out; log-softmax by hand on logits / temperature;
    the truncated IS weight of a sequence = min(exp(sum over its loss tokens of old - rollout), cap)."""
    g = cfg.grpo
    seq_terms, token_terms = [], []
    for i, n in enumerate(LENS):
        kept = [t for t in range(n) if LOSS_MASK[i][t]]
        if g.importance_sampling.startswith("sequence"):
            w = is_weight(sum(old[i][t] - rollout[i][t] for t in kept), g.importance_sampling)
        terms = []
        for t in kept:
            row = logits[i, t] / temperature
            logp = row[tokens[i][t]] - row.max() - torch.log(torch.exp(row - row.max()).sum())
            ratio = torch.exp(logp - old[i][t])
            a = ADVANTAGES[i]
            surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - g.clip_low, 1 + g.clip_high) * a)
            if g.importance_sampling.startswith("token"):
                w = is_weight(old[i][t] - rollout[i][t], g.importance_sampling)
            if g.importance_sampling != "off":
                surrogate = surrogate * w
            d = ref[i][t] - logp
            terms.append(surrogate + g.kl_coef * (torch.exp(d) - d - 1))  # k3
        seq_terms.append(terms)
        token_terms += terms
    if g.loss_agg == "token_mean":
        return sum(token_terms) / len(token_terms)
    return sum(sum(s) / len(s) for s in seq_terms if s) / len(LENS)  # seq_mean_token_mean


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    prompt = [1, 2]
    tokens = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENS]
    # Old log-probs away from the current ones (ratios clip), rollout log-probs near the old ones
    # (sequence weights both under and over the cap).
    old = [(torch.randn(n, generator=g) * 0.5 - 2.0).tolist() for n in LENS]
    rollout = [[o + 0.3 * float(torch.randn((), generator=g)) for o in row] for row in old]
    ref = [(torch.randn(n, generator=g) * 0.5 - 2.0).tolist() for n in LENS]
    logits = torch.randn(len(LENS), max(LENS), VOCAB, generator=g, dtype=torch.float64) * 2
    return prompt, tokens, old, rollout, ref, logits


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("is_level", ["off", "token", "sequence", "token_mask", "sequence_mask"])
def test_loss_mask_is_weights_and_temperature_match_reference(agg, is_level):
    temperature = 0.6
    cfg = RunConfig(
        grpo={"group_size": 2, "loss_agg": agg, "kl_coef": 0.1, "kl_kind": "k3", "clip_low": 0.2, "clip_high": 0.28,
              "importance_sampling": is_level, "importance_cap": CAP, "updates_per_batch": 2},
        rollout={"temperature": temperature},
    )
    algo = GRPO(cfg)
    assert algo.loss_temperature() == temperature
    prompt, tokens, old, rollout, ref, logits = _inputs(3)
    kept_tokens = sum(map(sum, LOSS_MASK))
    batch = SequenceBatch(
        input_ids=[prompt + t for t in tokens],
        prompt_lens=[len(prompt)] * len(LENS),
        token_fields={"advantages": [[a] * n for a, n in zip(ADVANTAGES, LENS)], "old_logprobs": old,
                      "rollout_logprobs": rollout, "ref_logprobs": ref,
                      "loss_mask": [[float(k) for k in row] for row in LOSS_MASK]},
        # The step's denominator, by hand: kept tokens, or sequences.
        loss_normalizer=float(kept_tokens if agg == "token_mean" else len(LENS)),
    )
    mb = MicroBatch.from_sequences(batch)
    mb = dataclasses.replace(mb, token_fields={k: v.double() for k, v in mb.token_fields.items()},
                             completion_mask=mb.completion_mask.double())
    hidden = logits.clone().requires_grad_(True)
    out = PolicyOutputs(hidden=hidden, lm_head_weight=torch.eye(VOCAB, dtype=torch.float64), temperature=temperature)
    loss, metrics = algo.loss(out, mb)
    loss.backward()

    ref_logits = logits.clone().requires_grad_(True)
    expected = reference_loss(ref_logits, tokens, old, rollout, ref, cfg, temperature)
    expected.backward()
    # The library computes log-probs in float32, the reference in float64.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(hidden.grad, ref_logits.grad, atol=1e-6, rtol=1e-4)
    assert metrics["tokens"] == kept_tokens
    for i, n in enumerate(LENS):
        for t in range(n):
            moved = hidden.grad[i, t].abs().max().item()
            # A token out of the loss gets exactly no gradient; every kept token gets some.
            assert (moved == 0) if not LOSS_MASK[i][t] else (moved > 1e-6), (i, t, moved)
    if is_level == "sequence":
        log_w = [sum(old[i][t] - rollout[i][t] for t in range(n) if LOSS_MASK[i][t]) for i, n in enumerate(LENS)]
        # The case needs both a capped and an uncapped sequence weight to be telling.
        assert min(log_w) < math.log(CAP) < max(log_w), log_w


def test_temperature_changes_the_loss_as_the_reference_does():
    """The same batch at two temperatures gives two different losses, each the reference's: the
    temperature really divides the logits (a loss that ignored it would pass at T=1 only)."""
    prompt, tokens, old, rollout, ref, logits = _inputs(4)
    values = []
    for temperature in (1.0, 1.7):
        cfg = RunConfig(grpo={"group_size": 2, "kl_coef": 0.1, "updates_per_batch": 2},
                        rollout={"temperature": temperature})
        batch = SequenceBatch(
            input_ids=[prompt + t for t in tokens], prompt_lens=[len(prompt)] * len(LENS),
            token_fields={"advantages": [[a] * n for a, n in zip(ADVANTAGES, LENS)], "old_logprobs": old,
                          "rollout_logprobs": rollout, "ref_logprobs": ref,
                          "loss_mask": [[float(k) for k in row] for row in LOSS_MASK]},
            loss_normalizer=float(sum(map(sum, LOSS_MASK))),
        )
        mb = MicroBatch.from_sequences(batch)
        out = PolicyOutputs(hidden=logits.float(), lm_head_weight=torch.eye(VOCAB), temperature=temperature)
        loss, _ = GRPO(cfg).loss(out, mb)
        expected = reference_loss(logits, tokens, old, rollout, ref, cfg, temperature)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        values.append(loss.item())
    assert abs(values[0] - values[1]) > 1e-2, values
