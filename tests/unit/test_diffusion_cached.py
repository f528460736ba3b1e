"""The cached, parallel sampler: cache "none" is the plain sampler bit for bit; a cache refreshed at
every call computes the plain sampler's logits; hints and the threshold rule hold."""
from __future__ import annotations

import pytest
import torch

from rollouts.diffusion import diffusion_sample
from rollouts.diffusion_cached import cached_diffusion_sample
from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

V, MASK, PAD = 12, 11, 0


class Toy:
    """A deterministic bidirectional stand-in: own token, position, and the mean of attended tokens."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.emb, self.pos, self.out = torch.randn(V, 8, generator=g), torch.randn(64, 8, generator=g), torch.randn(8, V, generator=g) * 2

    def __call__(self, ids, attention):
        e = self.emb[ids] * attention[..., None]
        context = e.sum(1, keepdim=True) / attention.sum(1, keepdim=True)[..., None]
        return (e + context + self.pos[: ids.shape[1]]) @ self.out


def llada(layers=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = LLaDAConfig(d_model=32, n_heads=4, n_layers=layers, mlp_hidden_size=48, vocab_size=V, mask_token_id=MASK)
    return LLaDAForDiffusion(config).to(dtype).eval()


PROMPTS = [[3, 4, 5], [1, 2], [6, 7, 8, 9, 10]]


@pytest.mark.parametrize("temperature,remasking,hinted", [(0.0, "low_confidence", False), (1.3, "low_confidence", True),
                                                          (0.8, "random", True)])
@pytest.mark.parametrize("gen_length,block_length,steps", [(8, 4, 4), (12, 4, 6), (12, 6, 12)])
def test_cache_none_is_bit_identical_to_the_plain_sampler(temperature, remasking, hinted, gen_length, block_length, steps):
    hints = [{}, {1: 7, 2: 8}, {0: 9, gen_length - 1: 4}] if hinted else None
    kw = dict(mask_id=MASK, pad_id=PAD, gen_length=gen_length, block_length=block_length, steps=steps,
              temperature=temperature, remasking=remasking, hints=hints)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = diffusion_sample(Toy(), PROMPTS, generator=g1, **kw)
    got = cached_diffusion_sample(Toy(), PROMPTS, generator=g2, cache="none", **kw)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.committed, want.committed)
    assert torch.equal(got.hint_mask, want.hint_mask)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws, in the same order
    assert got.calls_per_block == [steps // (gen_length // block_length)] * (gen_length // block_length)


def test_cache_none_with_the_llada_model_and_a_fallback_for_plain_functions():
    model = llada(dtype=torch.float32)
    kw = dict(mask_id=MASK, pad_id=PAD, gen_length=8, block_length=4, steps=4, temperature=1.0)
    want = diffusion_sample(lambda i, a: model(i, a).logits, PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    got = cached_diffusion_sample(model, PROMPTS, generator=torch.Generator().manual_seed(1), cache="none", **kw)
    assert torch.equal(got.tokens, want.tokens)
    # A logits_fn has no cache: "dual" falls back to "none" and says so.
    fallback = cached_diffusion_sample(Toy(), PROMPTS, generator=torch.Generator().manual_seed(1), cache="dual", **kw)
    plain = diffusion_sample(Toy(), PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    assert fallback.cache_used == "none" and torch.equal(fallback.tokens, plain.tokens)


def _compare_records(cached, plain):
    """Each cached call's logits (at its candidates) against the plain call's at the same positions."""
    assert len(cached) == len(plain)
    worst = 0.0
    for (cand, logits), (_, full) in zip(cached, plain):
        rows = torch.arange(cand.shape[0])[:, None]
        worst = max(worst, float((logits - full[rows, cand]).abs().max()))
    return worst


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_refreshed_at_every_call_gives_the_plain_logits(cache):
    model = llada()
    hints = [{}, {2: 5}, {5: 3, 9: 1}]
    kw = dict(mask_id=MASK, pad_id=PAD, gen_length=12, block_length=4, steps=6, temperature=0.0, hints=hints)
    plain_rec, cached_rec = [], []
    plain = cached_diffusion_sample(model, PROMPTS, cache="none", record=plain_rec, **kw)
    got = cached_diffusion_sample(model, PROMPTS, cache=cache, refresh_every=1, record=cached_rec, **kw)
    assert _compare_records(cached_rec, plain_rec) < 1e-12
    assert torch.equal(got.tokens, plain.tokens)
    assert got.full_calls == 6 and got.cache_used == cache
    # No [B, W, V] tensor: a cached call forms logits at the block's masked positions only.
    assert all(logits.shape[1] <= 4 for _, logits in cached_rec)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_layer_caches_are_exact_and_two_layers_approximate(cache):
    """With one layer, cached keys/values depend only on their own (unchanged) tokens, so the cache
    is exact; with two they depend on the block's tokens, so a stale cache must show."""
    kw = dict(mask_id=MASK, pad_id=PAD, gen_length=12, block_length=4, steps=12, temperature=0.0)
    for layers, exact in ((1, True), (2, False)):
        model = llada(layers=layers, seed=3)
        plain_rec, cached_rec = [], []
        cached_diffusion_sample(model, PROMPTS, cache="none", record=plain_rec, **kw)
        got = cached_diffusion_sample(model, PROMPTS, cache=cache, record=cached_rec, **kw)
        assert got.full_calls == 3  # one refresh per block
        # Compare the first block's calls (later blocks may diverge in tokens when approximate).
        worst = _compare_records(cached_rec[:4], plain_rec[:4])
        assert (worst < 1e-12) if exact else (worst > 1e-9)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_hints_and_parallel_decoding(cache):
    model = llada(seed=1)
    hints = [{0: 7, 5: 8, 11: 9}, {3: 4}, {}]
    got = cached_diffusion_sample(model, PROMPTS, mask_id=MASK, pad_id=PAD, gen_length=12, block_length=4, steps=6,
                                  temperature=1.0, hints=hints, generator=torch.Generator().manual_seed(0),
                                  cache=cache, threshold=0.3)
    assert (got.tokens != MASK).all()
    for i, hint in enumerate(hints):
        assert all(got.tokens[i, p] == t for p, t in hint.items())
        # Every free position committed (a random model may commit the mask token itself, which
        # leaves the position masked for a later call, as in the plain sampler).
        assert got.committed[i].sum() >= 12 - len(hint)
    assert all(c >= 1 for c in got.calls_per_block)
    # Every call commits at least one position in each row that still had one masked in the block.
    assert sum(got.calls_per_block) == got.committed.shape[1]


def test_threshold_extremes():
    model = llada(seed=2)
    kw = dict(mask_id=MASK, pad_id=PAD, gen_length=8, block_length=4, steps=2, temperature=0.0, cache="dual")
    everything = cached_diffusion_sample(model, PROMPTS, threshold=1e-9, **kw)
    assert everything.calls_per_block == [1, 1]
    one_by_one = cached_diffusion_sample(model, PROMPTS, threshold=1.0, **kw)
    assert one_by_one.calls_per_block == [4, 4] and (one_by_one.committed == 1).all()
    with pytest.raises(ValueError, match="low_confidence"):
        cached_diffusion_sample(model, PROMPTS, threshold=0.9, remasking="random", **kw)


def test_threshold_never_commits_the_mask_token():
    """A model whose top prediction everywhere is the mask token: with a threshold each call still
    commits one real token, so a block ends within block_length calls."""
    from rollouts.diffusion_cached import cached_diffusion_sample

    vocab, mask_id = 7, 6

    def logits_fn(ids, attention):
        logits = torch.zeros(ids.shape + (vocab,), dtype=torch.float64)
        logits[..., mask_id] = 10.0  # the mask token is by far the likeliest
        return logits

    out = cached_diffusion_sample(logits_fn, [[1, 2]], mask_id=mask_id, pad_id=0, gen_length=4, block_length=4,
                                  steps=2, temperature=0.0, threshold=0.9)
    assert (out.tokens != mask_id).all() and out.calls_per_block == [4]
