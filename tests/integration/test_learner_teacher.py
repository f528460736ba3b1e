"""The learner's teacher forward (OPSD) and the hidden-state loss contract, against plain HF forwards.

Every check scores each sequence alone with a plain transformers model (no padding, no
MicroBatch, no DeepSpeed): the student's and the teacher's hidden states at the completion
positions, the teacher's weights (frozen, live, EMA), and a whole distillation step through the
chunked divergence, on ZeRO-2 in this process and on two ZeRO-3 ranks where the output layer is
partitioned.
"""
import random
import sys

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rl.core.batch import SequenceBatch
from rl.algorithms.opsd import TeacherConfig
from rl.config import LearnerConfig
from rl.algorithms.divergences import chunked_divergence
from rl.learner.group import LearnerGroup, LearnerWorker, free_port
from rl.demo.tiny import build_model

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TEMPERATURE = 1.1
LR = 1e-3
WARMUP = 2
ATOL = 1e-6
# Unlike test_learner's policy gradient, the divergence between two near-uniform random-model
# distributions has many gradient elements that nearly cancel, down to float noise (which changes
# with the thread count). Adam's first steps move every element by about lr whatever its size,
# so that noise would flip whole steps. At this scale most gradients sit near Adam's eps, where a
# step grows with the gradient: thread counts then move the weights by ~1e-7, while 80% of them
# still move by over 1e-4.
GRAD_SCALE = 1e-4
MAX_GRAD_NORM = 1e3
# (student prompt, completion, teacher prompt) lengths: teacher prompts longer and shorter, so
# the two views pad differently and only exact alignment gives equal hidden states.
SHAPES = [(3, 5, 6), (1, 2, 4), (4, 6, 2), (2, 1, 5), (2, 4, 2)]


def make_batch(seed: int, same_view: bool = False) -> SequenceBatch:
    rng = random.Random(seed)
    ids, prompt_lens, teacher_ids, teacher_lens = [], [], [], []
    for p, c, tp in SHAPES:
        completion = [rng.randrange(5, 300) for _ in range(c)]
        ids.append([rng.randrange(5, 300) for _ in range(p)] + completion)
        prompt_lens.append(p)
        teacher_ids.append([rng.randrange(5, 300) for _ in range(tp)] + completion)
        teacher_lens.append(tp)
    if same_view:
        teacher_ids, teacher_lens = ids, prompt_lens
    n_tokens = sum(c for _, c, _ in SHAPES)
    return SequenceBatch(ids, prompt_lens, loss_normalizer=n_tokens / GRAD_SCALE,
                         teacher_input_ids=teacher_ids, teacher_prompt_lens=teacher_lens)


STEP_BATCHES = [make_batch(1), make_batch(2)]


def distill_loss(out, mb):
    """OPSD's forward KL(p_T || p_S), token sum over the step's tokens, in chunks of 3 positions."""
    per_token = chunked_divergence(
        out.hidden, out.teacher_hidden, out.lm_head_weight, mb.completion_mask, temperature=out.temperature,
        chunk_size=3, teacher_lm_head_weight=out.teacher_lm_head_weight,
    )
    return per_token.sum() / mb.loss_normalizer, {"divergence_sum": float(per_token.detach().sum())}


CAPTURED: list[dict] = []


def capturing_loss(out, mb):
    """distill_loss, keeping what the loss saw, one entry per sequence (in-process workers only)."""
    with torch.no_grad():
        logits = out.logits()
        for i, n in enumerate(mb.completion_mask.sum(-1).long().tolist()):
            CAPTURED.append({
                "hidden": out.hidden[i, :n].clone(), "teacher_hidden": out.teacher_hidden[i, :n].clone(),
                "logits": logits[i, :n].clone(),
                "teacher_lm_head_weight": None if out.teacher_lm_head_weight is None else out.teacher_lm_head_weight.clone(),
            })
    return distill_loss(out, mb)


def captured_step(worker, batch) -> tuple[list[dict], dict]:
    """What the loss saw, per sequence, and the step's metrics."""
    CAPTURED.clear()
    metrics = worker.train_step(batch, capturing_loss, TEMPERATURE, num_micro_batches=3)
    return list(CAPTURED), metrics


def learner_cfg(**kw) -> LearnerConfig:
    base = dict(lr=LR, weight_decay=0.1, betas=(0.8, 0.95), warmup_steps=WARMUP, max_grad_norm=MAX_GRAD_NORM)
    return LearnerConfig(**{**base, **kw})



def in_process_worker(model_dir, kind="frozen", decay=0.99, **cfg) -> LearnerWorker:
    cfg = learner_cfg(**{"micro_batch_size": 2, **cfg})
    return LearnerWorker(str(model_dir), cfg, "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                         teacher=TeacherConfig(kind=kind, ema_decay=decay))


# ---------------------------------------------------------------------------------------------
# Plain references


def load(model_dir, state=None):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    return model


@torch.no_grad()
def plain_hidden(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Final hidden states (after the norm) predicting each completion token, this sequence alone."""
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    return hidden[prompt_len - 1 : len(ids) - 1]


def plain_teacher_hidden(model, batch: SequenceBatch) -> list[torch.Tensor]:
    return [plain_hidden(model, ids, p) for ids, p in zip(batch.teacher_input_ids, batch.teacher_prompt_lens)]


def plain_student_hidden(model, batch: SequenceBatch) -> list[torch.Tensor]:
    return [plain_hidden(model, ids, p) for ids, p in zip(batch.input_ids, batch.prompt_lens)]


def assert_rows_close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert [r.shape for r in actual] == [r.shape for r in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def plain_distill_steps(model_dir) -> dict[str, torch.Tensor]:
    """The two STEP_BATCHES steps with a frozen teacher: each sequence alone, full logits, the
    forward KL written out, autograd."""
    student, teacher = load(model_dir), load(model_dir).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.8, 0.95), weight_decay=0.1)
    for step, batch in enumerate(STEP_BATCHES):
        total = torch.zeros(())
        for ids, p, tids, tp in zip(batch.input_ids, batch.prompt_lens, batch.teacher_input_ids, batch.teacher_prompt_lens):
            s = student(input_ids=torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1] / TEMPERATURE
            t = teacher(input_ids=torch.tensor([tids])).logits[0, tp - 1 : len(tids) - 1] / TEMPERATURE
            log_t = torch.log_softmax(t, dim=-1)
            total = total + (log_t.exp() * (log_t - torch.log_softmax(s, dim=-1))).sum()
        opt.zero_grad()
        (total / batch.loss_normalizer).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        opt.step()
    return student.state_dict()


def assert_state_close(actual: dict, expected: dict, initial: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    assert max((actual[k] - initial[k]).abs().max().item() for k in actual) > 100 * ATOL


# ---------------------------------------------------------------------------------------------
# Alignment and teacher kinds (one ZeRO-2 rank in this process)


@pytest.mark.parametrize("kind", ["frozen", "live"])
def test_identical_view_gives_the_students_hidden_states(tiny_model, kind):
    """Frozen before any step, live at every step: teacher == student, so the divergence is 0."""
    worker = in_process_worker(tiny_model, kind)
    steps = 3 if kind == "live" else 1
    for _ in range(steps - 1):
        worker.train_step(STEP_BATCHES[0], distill_loss, TEMPERATURE)
    same = make_batch(3, same_view=True)
    seen, metrics = captured_step(worker, same)
    assert_rows_close([c["teacher_hidden"] for c in seen], [c["hidden"] for c in seen], atol=ATOL)
    assert metrics["divergence_sum"] == pytest.approx(0.0, abs=1e-6)
    if kind == "live":
        assert all(c["teacher_lm_head_weight"] is None for c in seen)  # the policy's own head


def test_frozen_teacher_is_aligned_and_stays_initial(tiny_model):
    """Teacher prompts of other lengths: each teacher row equals a plain forward of that teacher
    sequence alone at the completion positions, after every step (frozen), while the student,
    checked against plain forwards of the weights it had at that step, moves away."""
    worker = in_process_worker(tiny_model, "frozen", lr=1e-2)
    initial = load(tiny_model)
    batch = make_batch(4)
    want_teacher = plain_teacher_hidden(initial, batch)
    state = initial.state_dict()
    for _ in range(3):
        seen, _ = captured_step(worker, batch)
        assert_rows_close([c["teacher_hidden"] for c in seen], want_teacher)
        torch.testing.assert_close(seen[0]["teacher_lm_head_weight"], initial.lm_head.weight.detach(), atol=0, rtol=0)
        current = load(tiny_model, state)
        want_hidden = plain_student_hidden(current, batch)
        assert_rows_close([c["hidden"] for c in seen], want_hidden)
        want_logits = [h @ current.lm_head.weight.detach().T / TEMPERATURE for h in want_hidden]
        assert_rows_close([c["logits"] for c in seen], want_logits)
        state = worker.full_state_dict()
    moved = [(c["hidden"] - h).abs().max().item() for c, h in zip(seen, plain_student_hidden(initial, batch))]
    assert max(moved) > 1e-2


def test_ema_teacher_follows_the_formula(tiny_model):
    """After k steps the teacher's weights are e_k = d * e_{k-1} + (1 - d) * theta_k, e_0 = theta_0,
    with theta_k the policy after step k: its hidden states and head equal a plain model holding e_k."""
    decay = 0.6
    worker = in_process_worker(tiny_model, "ema", decay=decay, lr=1e-2)
    ema = load(tiny_model).state_dict()
    batch = make_batch(5)
    for _ in range(3):
        worker.train_step(batch, distill_loss, TEMPERATURE)
        theta = worker.full_state_dict()
        ema = {k: decay * ema[k] + (1 - decay) * theta[k] for k in ema}
    seen, _ = captured_step(worker, batch)
    teacher = load(tiny_model, ema)
    assert_rows_close([c["teacher_hidden"] for c in seen], plain_teacher_hidden(teacher, batch))
    torch.testing.assert_close(seen[0]["teacher_lm_head_weight"], ema["lm_head.weight"], atol=ATOL, rtol=0)
    # The average differs from both ends, so the comparison is not with the initial or current weights.
    assert (ema["lm_head.weight"] - theta["lm_head.weight"]).abs().max() > 1e-3
    assert (ema["lm_head.weight"] - load(tiny_model).lm_head.weight).abs().max() > 1e-3


def test_teacher_view_must_end_with_the_same_completion(tiny_model):
    worker = in_process_worker(tiny_model, "live")
    bad = make_batch(6)
    bad.teacher_input_ids[1] = bad.teacher_input_ids[1][:-1] + [7]
    with pytest.raises(ValueError, match="same completion tokens"):
        worker.train_step(bad, distill_loss, TEMPERATURE)


def test_missing_teacher_model_is_named(tiny_model):
    worker = LearnerWorker(str(tiny_model), learner_cfg(), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10)
    with pytest.raises(ValueError, match="built without teacher settings"):
        worker.train_step(STEP_BATCHES[0], distill_loss, TEMPERATURE)


# ---------------------------------------------------------------------------------------------
# A whole distillation step through the chunked divergence: gradients reach the output layer


def test_distillation_step_matches_plain_pytorch(tiny_model):
    worker = in_process_worker(tiny_model, "frozen", micro_batch_size=1)
    for batch in STEP_BATCHES:
        worker.train_step(batch, distill_loss, TEMPERATURE)
    assert_state_close(worker.full_state_dict(), plain_distill_steps(tiny_model), load(tiny_model).state_dict())


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Untied, hidden 384: the output layer (303 x 384) and the projections exceed ZeRO-3's
    1e5-element persistence threshold, so they are partitioned outside forwards, and the output
    layer is a parameter of its own that no module forward of the learner uses."""
    return build_model(tmp_path_factory.mktemp("wide") / "model", arch="llama", tied=False, hidden=384)


def test_distillation_step_on_two_zero3_ranks(ray_session, wide_model):
    cfg = learner_cfg(num_learners=2, zero_stage=3, micro_batch_size=1)
    group = LearnerGroup(str(wide_model), cfg, "float32", seed=0, total_steps=2, teacher=TeacherConfig(kind="frozen"))
    try:
        for batch in STEP_BATCHES:
            group.train_step(batch, distill_loss, TEMPERATURE)
        final = group.full_state_dict()
    finally:
        group.close()
    assert_state_close(final, plain_distill_steps(wide_model), load(wide_model).state_dict())
