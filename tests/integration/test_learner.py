"""The DeepSpeed learner against plain PyTorch written here: same step whatever the split.

The reference runs each sequence alone (no padding, no MicroBatch), sums the token losses in a
loop, divides by the global token count, clips and steps a torch AdamW whose lr is set by hand
from the warm-up formula. Every learner configuration (micro-batch size, 1 or 2 ranks, ZeRO-2
or ZeRO-3) must end at those parameters.
"""
import sys
from types import SimpleNamespace

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.core.batch import SequenceBatch
from rl.config import LearnerConfig
from rl.learner.group import LearnerGroup, LearnerWorker, free_port
from tests.batches import varied_batch

pytestmark = pytest.mark.slow

# Ray workers cannot import this test module, so the loss functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TEMPERATURE = 0.7
# Parameters move ~1e-3 per step, 1000x the tolerance; a larger lr reshapes the tiny model so
# much that step 1's float32 noise is amplified by step 2.
LR = 1e-3
WARMUP = 2  # the two reference steps use lr/2 then lr
ATOL = 1e-6
# Adam divides by |g| + 1e-8: a gradient element near 1e-8 turns float32 summation noise into
# ~1e-3 of a step. Scaling the loss up keeps every element far above eps, so the comparison
# can be tight; the clip threshold scales along and still bites (the norm is ~6x above it).
GRAD_SCALE = 1e4
MAX_GRAD_NORM = 1e3


STEP_BATCHES = [varied_batch(1, GRAD_SCALE), varied_batch(2, GRAD_SCALE)]


def token_mean_pg_loss(out, mb):
    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    loss = -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer
    return loss, {"tokens": mb.completion_mask.sum().item()}


def failing_loss(out, mb):
    raise ValueError("loss exploded on purpose")


def learner_cfg(**kw) -> LearnerConfig:
    base = dict(lr=LR, weight_decay=0.1, betas=(0.8, 0.95), warmup_steps=WARMUP, max_grad_norm=MAX_GRAD_NORM)
    return LearnerConfig(**{**base, **kw})



def in_process_worker(model_dir, **cfg) -> LearnerWorker:
    return LearnerWorker(str(model_dir), learner_cfg(**cfg), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10)


# ---------------------------------------------------------------------------------------------
# The independent reference


def sequence_token_logits(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Logits predicting each completion token, from a forward of this sequence alone."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits[prompt_len - 1 : len(ids) - 1].float() / TEMPERATURE


def reference_logprobs(model, batch: SequenceBatch):
    logprobs, entropies = [], []
    with torch.no_grad():
        for ids, p in zip(batch.input_ids, batch.prompt_lens):
            logp = torch.log_softmax(sequence_token_logits(model, ids, p), dim=-1)
            logprobs.append(logp[torch.arange(len(ids) - p), torch.tensor(ids[p:])])
            entropies.append(-(logp.exp() * logp).sum(-1))
    return logprobs, entropies


def reference_step(model, opt, batch: SequenceBatch, step: int) -> tuple[float, float]:
    total = torch.zeros(())
    for ids, p, adv in zip(batch.input_ids, batch.prompt_lens, batch.token_fields["advantages"]):
        logp = torch.log_softmax(sequence_token_logits(model, ids, p), dim=-1)
        for t, token in enumerate(ids[p:]):
            total = total - adv[t] * logp[t, token]
    loss = total / batch.loss_normalizer
    opt.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    for group in opt.param_groups:
        group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
    opt.step()
    return loss.item(), grad_norm.item()


@pytest.fixture(scope="module")
def reference(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    logprobs, entropies = reference_logprobs(model, STEP_BATCHES[0])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.8, 0.95), weight_decay=0.1)
    steps = [reference_step(model, opt, b, k) for k, b in enumerate(STEP_BATCHES)]
    return SimpleNamespace(
        initial=initial,
        logprobs=logprobs,
        entropies=entropies,
        losses=[s[0] for s in steps],
        grad_norms=[s[1] for s in steps],
        final=model.state_dict(),
    )


def assert_state_close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_rows_close(actual: list[list[float]], expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert [len(r) for r in actual] == [len(r) for r in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.tensor(a), e, atol=atol, rtol=0)


def assert_steps_match(metrics: list[dict], reference) -> None:
    for k, (m, batch) in enumerate(zip(metrics, STEP_BATCHES)):
        assert m["lr"] == pytest.approx(LR * min(1.0, (k + 1) / WARMUP), rel=1e-12)
        assert m["grad_norm"] == pytest.approx(reference.grad_norms[k], rel=1e-5)
        assert m["loss"] == pytest.approx(reference.losses[k], rel=1e-5)
        assert m["tokens"] == sum(batch.completion_lens())


# ---------------------------------------------------------------------------------------------
# One process, in the test process


@pytest.mark.parametrize(
    "micro_batch_size, checkpointing", [(1, False), (4, False), (4, True)], ids=["mb1", "mb4", "mb4-checkpointing"]
)
def test_micro_batch_size_does_not_change_the_step(tiny_model, reference, micro_batch_size, checkpointing):
    worker = in_process_worker(tiny_model, micro_batch_size=micro_batch_size, gradient_checkpointing=checkpointing)
    metrics = [worker.train_step(b, token_mean_pg_loss, TEMPERATURE) for b in STEP_BATCHES]
    assert_steps_match(metrics, reference)
    final = worker.full_state_dict()
    assert_state_close(final, reference.final)
    moved = max((final[k] - reference.initial[k]).abs().max().item() for k in final)
    assert moved > 100 * ATOL  # the comparison is not between two unmoved models


def test_explicit_micro_batch_count_pads_with_placeholders(tiny_model, reference):
    worker = in_process_worker(tiny_model, micro_batch_size=2)
    metrics = [worker.train_step(b, token_mean_pg_loss, TEMPERATURE, num_micro_batches=7) for b in STEP_BATCHES]
    assert_steps_match(metrics, reference)
    assert_state_close(worker.full_state_dict(), reference.final)


def test_compute_logprobs_matches_hf_forward(tiny_model, reference):
    worker = in_process_worker(tiny_model, micro_batch_size=2)
    logprobs, entropies = worker.compute_logprobs(STEP_BATCHES[0], TEMPERATURE, with_entropy=True)
    assert_rows_close(logprobs, reference.logprobs)
    assert_rows_close(entropies, reference.entropies)
    assert worker.compute_logprobs(STEP_BATCHES[0], TEMPERATURE)[1] is None


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_lr_follows_linear_warmup(tiny_model, warmup_steps):
    worker = in_process_worker(tiny_model, warmup_steps=warmup_steps)
    lrs = [worker.train_step(STEP_BATCHES[0], token_mean_pg_loss)["lr"] for _ in range(5)]
    expected = [LR * (min(1.0, (k + 1) / warmup_steps) if warmup_steps else 1.0) for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Ray groups: 1 and 2 ranks, ZeRO-2 and ZeRO-3


@pytest.fixture(scope="module", params=[(1, 2), (2, 2), (2, 3)], ids=lambda c: f"{c[0]}rank-zero{c[1]}")
def trained_group(request, ray_session, tiny_model):
    """A group (micro_batch_size 1: the 2-rank shards of 3 and 2 sequences run 3 micro-batches
    each, one of them a placeholder) after the two reference steps."""
    num_learners, stage = request.param
    cfg = learner_cfg(num_learners=num_learners, zero_stage=stage, micro_batch_size=1)
    group = LearnerGroup(str(tiny_model), cfg, "float32", seed=0, total_steps=2, with_reference=True)
    try:  # closed also when a step fails: its actors would hold the session's CPUs from the next group
        initial_logprobs = group.compute_logprobs(STEP_BATCHES[0], TEMPERATURE, with_entropy=True)
        metrics = [group.train_step(b, token_mean_pg_loss, TEMPERATURE) for b in STEP_BATCHES]
        yield SimpleNamespace(group=group, initial_logprobs=initial_logprobs, metrics=metrics)
    finally:
        group.close()


def test_group_step_matches_reference(trained_group, reference):
    assert_steps_match(trained_group.metrics, reference)
    assert_state_close(trained_group.group.full_state_dict(), reference.final)


def test_group_logprobs_in_input_order(trained_group, reference):
    logprobs, entropies = trained_group.initial_logprobs
    assert_rows_close(logprobs, reference.logprobs)
    assert_rows_close(entropies, reference.entropies)
    # The frozen reference model still scores like the initial weights; a batch smaller than
    # the group leaves a rank with placeholders only.
    ref_lp, _ = trained_group.group.compute_logprobs(STEP_BATCHES[0], TEMPERATURE, reference=True)
    assert_rows_close(ref_lp, reference.logprobs)
    one = trained_group.group.compute_logprobs(STEP_BATCHES[0].select([2]), TEMPERATURE, reference=True)[0]
    assert_rows_close(one, reference.logprobs[2:3])


def test_group_save_hf_loads_with_transformers(trained_group, tmp_path):
    trained_group.group.save_hf(str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert_state_close(loaded.state_dict(), trained_group.group.full_state_dict(), atol=0)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).eos_token == "<|im_end|>"


def test_group_error_names_rank_and_cause(trained_group):
    with pytest.raises(RuntimeError, match=r"learner rank \d of \d failed in train_step: ValueError: loss exploded"):
        trained_group.group.train_step(STEP_BATCHES[0], failing_loss, TEMPERATURE)
