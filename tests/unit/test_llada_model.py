"""rollouts.llada_model against a plain reference forward written here from the release's equations
(float64, small random config), its cache against the uncached forward, and its parameter names."""
from __future__ import annotations

import math

import pytest
import torch

from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

CONFIG = dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=96, vocab_size=50, mask_token_id=49, rope_theta=10000.0)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LLaDAForDiffusion(LLaDAConfig(**{**CONFIG, **overrides})).double().eval()
    with torch.no_grad():  # non-trivial norm weights, so that a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def reference_logits(model, ids, attention):
    """One row at a time, loops over heads, explicit softmax: the release's LLaMA block written out."""
    sd = {k: v for k, v in model.state_dict().items()}
    c = model.config
    hd, H, KVH = c.d_model // c.n_heads, c.n_heads, c.n_kv_heads or c.n_heads
    out = []
    for b in range(ids.shape[0]):
        W = ids.shape[1]
        x = sd["model.transformer.wte.weight"][ids[b]]

        def rms(z, w):
            return w * z / torch.sqrt((z * z).mean(-1, keepdim=True) + c.rms_norm_eps)

        def rope(z):  # z [W, hd]
            res = torch.empty_like(z)
            for p in range(W):
                for i in range(hd // 2):
                    angle = p / (c.rope_theta ** (2 * i / hd))
                    a, bb = z[p, i], z[p, i + hd // 2]
                    res[p, i] = a * math.cos(angle) - bb * math.sin(angle)
                    res[p, i + hd // 2] = bb * math.cos(angle) + a * math.sin(angle)
            return res

        for layer in range(c.n_layers):
            pre = f"model.transformer.blocks.{layer}."
            n = rms(x, sd[pre + "attn_norm.weight"])
            q, k, v = n @ sd[pre + "q_proj.weight"].T, n @ sd[pre + "k_proj.weight"].T, n @ sd[pre + "v_proj.weight"].T
            heads = []
            for h in range(H):
                g = h // (H // KVH)
                qh, kh, vh = rope(q[:, h * hd:(h + 1) * hd]), rope(k[:, g * hd:(g + 1) * hd]), v[:, g * hd:(g + 1) * hd]
                scores = qh @ kh.T / math.sqrt(hd)
                scores = scores.masked_fill(attention[b][None, :] == 0, -math.inf)  # bidirectional, keys masked
                heads.append(torch.softmax(scores, -1) @ vh)
            x = x + torch.cat(heads, -1) @ sd[pre + "attn_out.weight"].T
            m = rms(x, sd[pre + "ff_norm.weight"])
            gate, up = m @ sd[pre + "ff_proj.weight"].T, m @ sd[pre + "up_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * up) @ sd[pre + "ff_out.weight"].T
        x = rms(x, sd["model.transformer.ln_f.weight"])
        head = sd["model.transformer.wte.weight"] if c.weight_tying else sd["model.transformer.ff_out.weight"]
        out.append(x @ head.T)
    return torch.stack(out)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49, (2, 11), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0  # a right-padded row
    return ids, attention


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"weight_tying": True}])
def test_full_forward_equals_the_reference(overrides):
    model = make(**overrides)
    ids, attention = batch()
    got = model(ids, attention).logits
    want = reference_logits(model, ids, attention)
    valid = attention.bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-10, rtol=1e-9)


def test_state_dict_names_are_the_releases():
    model = LLaDAForDiffusion(LLaDAConfig(**{**CONFIG, "n_layers": 1}))
    per_block = ["attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.0.{n}.weight" for n in per_block}
    assert set(model.state_dict()) == expected
    tied = LLaDAForDiffusion(LLaDAConfig(**{**CONFIG, "n_layers": 1, "weight_tying": True}))
    assert set(tied.state_dict()) == expected - {"model.transformer.ff_out.weight"}
    # A release-shaped state dict (same names) loads strictly.
    model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, strict=True)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    loaded = LLaDAForDiffusion.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids, attention = batch()
    assert torch.equal(model(ids, attention).logits, loaded(ids, attention).logits)


def test_logits_at_and_span_forward_with_a_fresh_cache_equal_the_full_forward():
    model = make()
    ids, attention = batch()
    full = model(ids, attention).logits
    out = model.forward_cached(ids, attention)
    at = torch.tensor([[0, 3, 5], [2, 4, 7]])
    rows = torch.arange(2)[:, None]
    assert torch.allclose(model.forward_cached(ids, attention, logits_at=at).logits, full[rows, at], atol=1e-12)
    # The span recomputed on the cache of the same ids: the same logits (nothing stale).
    span = torch.tensor([[4, 5, 6, 7], [3, 4, 5, 6]])
    got = model.forward_cached(ids, attention, span=span, cache=out.cache, logits_at=torch.tensor([[0, 2], [1, 3]]))
    assert torch.allclose(got.logits, full[rows, torch.tensor([[4, 6], [4, 6]])], atol=1e-12)


def test_cached_forward_equals_the_uncached_one_at_the_block_positions():
    """Block positions changed since the cache was built: the span forward over the block must equal
    a full forward of the new ids wherever the cache holds exactly what the full forward would
    compute. With one layer, keys/values of the other positions depend only on their own tokens,
    so the cache is exact; with more layers only after a refresh."""
    model = make(n_layers=1)
    ids, attention = batch()
    cache = model.forward_cached(ids, attention).cache
    block = torch.tensor([[5, 6, 7], [2, 3, 4]])
    rows = torch.arange(2)[:, None]
    new = ids.clone()
    new[rows, block] = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = model.forward_cached(new, attention, span=block, cache=cache).logits
    want = model(new, attention).logits[rows, block]
    assert torch.allclose(got, want, atol=1e-12)


def test_a_cache_shifted_by_one_position_gives_different_logits():
    model = make()
    ids, attention = batch()
    attention = torch.ones_like(attention)
    cache = model.forward_cached(ids, attention).cache
    span = torch.tensor([[6, 7, 8], [6, 7, 8]])
    good = model.forward_cached(ids, attention, span=span, cache=cache).logits
    cache = model.forward_cached(ids, attention).cache
    for layer in range(len(cache.keys)):  # every cached key/value moved one position to the right
        cache.keys[layer] = torch.roll(cache.keys[layer], 1, dims=1)
        cache.values[layer] = torch.roll(cache.values[layer], 1, dims=1)
    shifted = model.forward_cached(ids, attention, span=span, cache=cache).logits
    assert (good - shifted).abs().max() > 1e-3
