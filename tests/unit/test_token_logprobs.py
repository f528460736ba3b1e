"""The fused, chunked token log-probs + entropy against a plain full-logits autograd reference."""
import pytest
import torch

from rl.core.kernels import chunked_token_logprobs, chunked_token_logprobs_and_entropy


def _inputs(seed=0, b=3, t=5, h=6, v=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 3:] = 0  # padding
    mask[2, 1:] = 0
    return hidden, weight, tokens, mask


def _reference(hidden, weight, tokens, temperature):
    logits = (hidden @ weight.T) / temperature if weight is not None else hidden / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# keep_bytes: 0 recomputes the probabilities in the backward, the default keeps them (tiny here).
@pytest.mark.parametrize("keep_bytes", [0, 256 * 2**20])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_values_and_gradients_match_full_logits(frozen_weight, keep_bytes):
    hidden, weight, tokens, mask = _inputs()
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen_weight)
        if fused:
            logp, entropy = chunked_token_logprobs_and_entropy(h, w, tokens, mask, temperature=0.7, chunk_size=4,
                                                                   keep_bytes=keep_bytes)
        else:
            logp, entropy = _reference(h, w, tokens, 0.7)
            logp, entropy = logp * mask, entropy * mask  # the fused function gives 0 at padding
        (upstream * logp * mask).sum().backward()
        grads.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    (lp, ent, gh, gw), (ref_lp, ref_ent, ref_gh, ref_gw) = grads
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    assert (lp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all()
    torch.testing.assert_close(gh, ref_gh)
    if frozen_weight:
        assert gw is None and ref_gw is None
    else:
        torch.testing.assert_close(gw, ref_gw)
    assert not ent.requires_grad


def test_logits_input_without_weight_and_without_mask():
    hidden, _, tokens, _ = _inputs(v=6, h=6)
    h = hidden.clone().requires_grad_()
    logp = chunked_token_logprobs(h, None, tokens, temperature=1.3, chunk_size=2)
    logp.sum().backward()
    r = hidden.clone().requires_grad_()
    ref, _ = _reference(r, None, tokens, 1.3)
    ref.sum().backward()
    torch.testing.assert_close(logp, ref)
    torch.testing.assert_close(h.grad, r.grad)

