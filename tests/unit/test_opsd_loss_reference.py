"""OPSD.loss (what the learner calls) against a plain reference written here, for every
token_loss (full, sampled, top_k) and aggregation (paper, code), with the per-entry clip on:
value and gradient with respect to the student's hidden states and output layer.

The reference goes position by position: logits = W h / T by a matrix-vector product, the
log-softmax by hand, each vocabulary entry's term capped at `clip` before the sum, then the
aggregation written out (paper: mean over each sequence's tokens, then over sequences; code:
mean over all tokens of the step).
"""
import pytest
import torch

from rl.algorithms.opsd import OPSD
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.config import RunConfig

LENS = [4, 1, 6]
HIDDEN, VOCAB = 6, 13
TEMPERATURE = 1.3
CLIP = 0.05
TOP_K = 5


def log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    top = logits.max()
    return logits - top - torch.log(torch.exp(logits - top).sum())


def entry_terms(s_logp, t_logp, kind, beta):
    s_p, t_p = s_logp.exp(), t_logp.exp()
    if kind == "forward_kl":
        return t_p * (t_logp - s_logp)
    if kind == "reverse_kl":
        return s_p * (s_logp - t_logp)
    m = beta * t_p + (1 - beta) * s_p
    return beta * t_p * (t_logp - m.log()) + (1 - beta) * s_p * (s_logp - m.log())


def reference_position(h, w, th, tw, token, token_loss, kind, beta, clip):
    s_logits, t_logits = (w @ h) / TEMPERATURE, (tw @ th).detach() / TEMPERATURE
    if token_loss == "sampled":
        s_lp, t_lp = log_softmax_by_hand(s_logits)[token], log_softmax_by_hand(t_logits)[token]
        return -(t_lp - s_lp).detach() * s_lp
    if token_loss == "top_k":
        entries = sorted(range(VOCAB), key=lambda v: -t_logits[v].item())[:TOP_K]
        s_logits, t_logits = s_logits[entries], t_logits[entries]
    terms = entry_terms(log_softmax_by_hand(s_logits), log_softmax_by_hand(t_logits), kind, beta)
    return sum(torch.clamp(term, max=clip) for term in terms)


def reference_loss(hidden, weight, teacher_hidden, teacher_weight, tokens, token_loss, aggregation, kind, beta, clip):
    per_seq = [
        [reference_position(hidden[i, t], weight, teacher_hidden[i, t], teacher_weight, tokens[i][t], token_loss, kind,
                            beta, clip) for t in range(n)]
        for i, n in enumerate(LENS)
    ]
    if aggregation == "paper":
        return sum(sum(s) / len(s) for s in per_seq) / len(per_seq), per_seq
    return sum(sum(s) for s in per_seq) / sum(LENS), per_seq


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENS]
    hidden = torch.randn(len(LENS), max(LENS), HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    # The teacher: other hidden states (another context) and its own, nearby, frozen head.
    teacher_hidden = hidden + 0.8 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    teacher_weight = weight + 0.3 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    return tokens, hidden, weight, teacher_hidden, teacher_weight


CASES = [("full", "forward_kl", 0.5), ("full", "reverse_kl", 0.5), ("full", "jsd", 0.3), ("top_k", "forward_kl", 0.5),
         ("top_k", "jsd", 0.5), ("sampled", "forward_kl", 0.5)]


@pytest.mark.parametrize("aggregation", ["paper", "code"])
@pytest.mark.parametrize("token_loss,kind,beta", CASES)
def test_opsd_loss_matches_reference(token_loss, kind, beta, aggregation):
    cfg = RunConfig(algorithm="opsd", opsd={"token_loss": token_loss, "divergence": kind, "jsd_beta": beta,
                                            "clip": CLIP, "top_k": TOP_K, "aggregation": aggregation,
                                            "chunk_size": 4})
    tokens, hidden, weight, teacher_hidden, teacher_weight = _case(7)
    batch = SequenceBatch(input_ids=[[1, 2] + t for t in tokens], prompt_lens=[2] * len(LENS),
                          # The step's denominator, by hand: sequences (paper) or tokens (code).
                          loss_normalizer=float(len(LENS) if aggregation == "paper" else sum(LENS)))
    mb = MicroBatch.from_sequences(batch)
    mb.completion_mask = mb.completion_mask.double()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = PolicyOutputs(hidden=h, lm_head_weight=w, temperature=TEMPERATURE, teacher_hidden=teacher_hidden,
                        teacher_lm_head_weight=teacher_weight)
    loss, metrics = OPSD(cfg).loss(out, mb)
    loss.backward()

    rh, rw = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected, per_seq = reference_loss(rh, rw, teacher_hidden, teacher_weight, tokens, token_loss, aggregation, kind,
                                       beta, CLIP)
    expected.backward()
    # `sampled` goes through float32 logits in the library, the others stay float64.
    tol = 1e-5 if token_loss == "sampled" else 1e-9
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=tol)
    torch.testing.assert_close(h.grad, rh.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w.grad, rw.grad, atol=tol, rtol=tol)
    assert h.grad[1, 1:].abs().max() == 0  # padding positions of the 1-token row: no gradient
    assert metrics["tokens"] == sum(LENS)
    assert metrics["divergence_sum"] == pytest.approx(sum(x.detach().item() for s in per_seq for x in s), rel=tol, abs=tol)
    if token_loss != "sampled":
        # The clip really bites here: without it the loss differs.
        unclipped, _ = reference_loss(hidden, weight, teacher_hidden, teacher_weight, tokens, token_loss, aggregation,
                                      kind, beta, clip=1e9)
        assert abs(unclipped.item() - expected.item()) > 1e-3

