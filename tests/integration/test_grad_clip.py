"""Gradient clipping bites: with learner.max_grad_norm below the step's gradient norm, the
learner's two steps equal plain PyTorch's clipped AdamW steps and NOT the unclipped ones.

Adam is invariant to a constant gradient scale, so a clip that scaled both steps alike would be
invisible; the two batches here have gradient norms 10x apart, so clipping both to the same
norm changes their relative weight in Adam's moments, and so the weights after step 2.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rl.config import LearnerConfig
from rl.learner.group import LearnerWorker, free_port
from tests.batches import varied_batch

pytestmark = pytest.mark.slow

LR = 1e-3
MAX_GRAD_NORM = 1e2
# Loss scales far above Adam's eps (see tests/integration/test_learner.py), 10x apart between the two steps.
BATCHES = [varied_batch(1, 1e4), varied_batch(2, 1e5)]


def token_mean_pg_loss(out, mb):
    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    loss = -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer
    return loss, {"tokens": mb.completion_mask.sum().item()}


def plain_adamw_steps(model_dir, max_norm):
    """Each sequence alone, token losses summed in a loop, clip_grad_norm_ (or not), AdamW."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.8, 0.95), weight_decay=0.1)
    norms = []
    for batch in BATCHES:
        total = torch.zeros(())
        for ids, p, adv in zip(batch.input_ids, batch.prompt_lens, batch.token_fields["advantages"]):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1], dim=-1)
            for t, token in enumerate(ids[p:]):
                total = total - adv[t] * logp[t, token]
        opt.zero_grad()
        (total / batch.loss_normalizer).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
    return model.state_dict(), norms


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def test_clipping_engages_and_changes_the_step(tiny_model):
    model_dir = tiny_model
    clipped, norms = plain_adamw_steps(model_dir, MAX_GRAD_NORM)
    unclipped, _ = plain_adamw_steps(model_dir, float("inf"))
    assert all(n > 3 * MAX_GRAD_NORM for n in norms), norms  # the clip engages on both steps

    cfg = LearnerConfig(lr=LR, weight_decay=0.1, betas=(0.8, 0.95), warmup_steps=0, max_grad_norm=MAX_GRAD_NORM)
    worker = LearnerWorker(str(model_dir), cfg, "float32", 0, 1, "127.0.0.1", free_port(), 0, 10)
    metrics = [worker.train_step(b, token_mean_pg_loss, 1.0) for b in BATCHES]
    learned = worker.full_state_dict()

    # The learner reports the norm before clipping, and steps as the clipped reference.
    assert [m["grad_norm"] for m in metrics] == pytest.approx(norms, rel=1e-4)
    assert max_diff(learned, clipped) < 1e-6
    # Without the clip the weights would be elsewhere: far beyond the tolerance above.
    assert max_diff(learned, unclipped) > 1e-4
