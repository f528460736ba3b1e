"""Likelihood estimators for masked-diffusion policies, by name: each a pure function that draws the
forwards it runs (rollouts.estimators.common.Estimator), called as

    get_estimator(name)(logits_fn, ids, attention, positions, answer_ids, *, mask_id, n=1,
                        generator=None, temperature=1.0) -> [B, T]

ids/attention: the rows as `rollouts.diffusion.answer_layout` lays them out (prompt, possibly with
d1's prompt mask applied, then the answer span; what `ids` holds at the answer positions is
ignored: each pass writes the answer tokens or the mask token there itself); positions [B, T]
the answer positions; answer_ids [B, T] the answer tokens. The result holds one term per answer
token; a row's sum is the estimate of the sequence's log-likelihood (or its ELBO), and the per-token
terms are what a token-level policy ratio reads. `n` is the number of random draws (masks, or
mask pairs) averaged; the one-step estimator is deterministic and ignores it.

Registered: `one_step` (d1, the paper recipes'), `mc_elbo` (LLaDA's ELBO by Monte Carlo, as VRPO
and SPG use it), `coupled` (DiffuCoder's complementary masks). Select with
`<algorithm section>.estimator=<name>` (diffu_grpo, igpo): the diffusion engine reports it and
the learner trains on it, with the same draws for a sequence. Add one with
@register_estimator(name) on a passes(B, T, *, n, generator, device) function.
"""
from __future__ import annotations

from rollouts.estimators.common import ESTIMATORS, Estimator, get_estimator, register_estimator
from rollouts.estimators import coupled, mc_elbo, one_step  # noqa: E402,F401  (registration)

__all__ = ["ESTIMATORS", "Estimator", "get_estimator", "register_estimator"]
