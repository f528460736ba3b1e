"""On-policy distillation from another model (opsd.teacher.kind=model): the learner loads the teacher
frozen beside the student, and the loss it runs equals a plain float64 computation from the
teacher's and the student's own logits, for every token loss; a teacher with another vocabulary is
refused at validation."""
import random
import sys

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rl.algorithms import build_algorithm
from rl.algorithms.opsd import DistillationLoss, TeacherConfig, check_teacher_tokenizer
from rl.config import LearnerConfig, load_config
from rl.core.batch import SequenceBatch
from rl.demo.tiny import build_model, build_tokenizer
from rl.learner.group import LearnerGroup, LearnerWorker, free_port
from rl.models import ModelError

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TEMPERATURE = 1.3
SHAPES = [(3, 5, 6), (1, 2, 4), (4, 6, 2), (2, 1, 5)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tied Qwen3 student (hidden 64) and an untied Llama teacher (hidden 96, other seed): another
    model with the same tokenizer, another hidden size and its own output layer."""
    root = tmp_path_factory.mktemp("opd")
    student = build_model(root / "student", arch="qwen3", tied=True, hidden=64, seed=0)
    teacher = build_model(root / "teacher", arch="llama", tied=False, hidden=96, seed=7)
    return student, teacher


def make_batch(seed: int) -> SequenceBatch:
    rng = random.Random(seed)
    ids, lens, tids, tlens = [], [], [], []
    for p, c, tp in SHAPES:
        completion = [rng.randrange(5, 300) for _ in range(c)]
        ids.append([rng.randrange(5, 300) for _ in range(p)] + completion)
        lens.append(p)
        tids.append([rng.randrange(5, 300) for _ in range(tp)] + completion)
        tlens.append(tp)
    return SequenceBatch(ids, lens, loss_normalizer=float(sum(c for _, c, _ in SHAPES)),
                         teacher_input_ids=tids, teacher_prompt_lens=tlens)


def completion_logits(model, ids, prompt_len) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, prompt_len - 1 : len(ids) - 1]
    return logits.double() / TEMPERATURE


def reference_sum(student, teacher, batch: SequenceBatch, loss: DistillationLoss) -> float:
    """The step's summed per-token loss, written out in float64 from both models' full logits."""
    total = 0.0
    for ids, p, tids, tp in zip(batch.input_ids, batch.prompt_lens, batch.teacher_input_ids, batch.teacher_prompt_lens):
        s, t = completion_logits(student, ids, p), completion_logits(teacher, tids, tp)
        if loss.token_loss == "sampled":
            tokens = torch.tensor(ids[p:])[:, None]
            ls, lt = s.log_softmax(-1).gather(-1, tokens), t.log_softmax(-1).gather(-1, tokens)
            total += float((-(lt - ls) * ls).sum())
            continue
        if loss.token_loss == "top_k":
            top = t.topk(loss.top_k, dim=-1).indices
            s, t = s.gather(-1, top), t.gather(-1, top)
        ls, lt = s.log_softmax(-1), t.log_softmax(-1)
        terms = lt.exp() * (lt - ls)
        if loss.clip is not None:
            terms = terms.clamp(max=loss.clip)
        total += float(terms.sum())
    return total


def load(folder, state=None):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    return model


def distill(token_loss: str, clip=0.05) -> DistillationLoss:
    return DistillationLoss(token_loss=token_loss, divergence="forward_kl", jsd_beta=0.5, clip=clip, top_k=5, chunk_size=3,
                            aggregation="token_mean")


def test_external_teacher_loss_matches_its_own_logits(pair):
    student_dir, teacher_dir = pair
    cfg = LearnerConfig(lr=1e-2, micro_batch_size=2, warmup_steps=0)
    worker = LearnerWorker(str(student_dir), cfg, "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           teacher=TeacherConfig(kind="model", path=str(teacher_dir)))
    teacher = load(teacher_dir)
    for step, (token_loss, clip) in enumerate([("full", 0.05), ("full", None), ("top_k", None), ("sampled", None)]):
        batch, loss = make_batch(step), distill(token_loss, clip)
        student = load(student_dir, worker.full_state_dict())  # the weights this step starts from
        want = reference_sum(student, teacher, batch, loss)
        metrics = worker.train_step(batch, loss, TEMPERATURE, num_micro_batches=2)
        assert metrics["divergence_sum"] == pytest.approx(want, rel=1e-5, abs=1e-6), token_loss
    # The teacher stayed frozen while the student trained.
    seen = worker.frozen.teacher_head_weight()
    torch.testing.assert_close(seen, teacher.lm_head.weight.detach(), atol=0, rtol=0)
    moved = worker.full_state_dict()["model.embed_tokens.weight"] - load(student_dir).model.embed_tokens.weight
    assert moved.abs().max() > 1e-4


def test_external_teacher_on_two_zero3_ranks(ray_session, pair):
    student_dir, teacher_dir = pair
    cfg = LearnerConfig(lr=1e-2, micro_batch_size=1, warmup_steps=0, num_learners=2, zero_stage=3)
    group = LearnerGroup(str(student_dir), cfg, "float32", seed=0, total_steps=2,
                         teacher=TeacherConfig(kind="model", path=str(teacher_dir)))
    try:
        batch, loss = make_batch(11), distill("full")
        metrics = group.train_step(batch, loss, TEMPERATURE)
    finally:
        group.close()
    want = reference_sum(load(student_dir), load(teacher_dir), batch, loss)
    assert metrics["divergence_sum"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_teacher_with_another_vocabulary_is_refused(pair, tmp_path):
    from transformers import AutoTokenizer

    student_dir, teacher_dir = pair
    other = build_model(tmp_path / "other", hidden=64, seed=3)
    build_tokenizer(other, vocab_size=300)  # same model, another tokenizer
    student_tok = AutoTokenizer.from_pretrained(student_dir)
    assert check_teacher_tokenizer(student_tok, str(teacher_dir)) == str(teacher_dir.resolve())
    with pytest.raises(ModelError, match="Cross-tokenizer distillation .* is out of scope"):
        check_teacher_tokenizer(student_tok, str(other))
    # The launch's validation (build_algorithm) refuses it too, before anything starts.
    with pytest.raises(ModelError, match="does not share the student's tokenizer"):
        build_algorithm(load_config("opsd_smollm2", [f"model.path={student_dir}", "opsd.teacher.kind=model",
                                                     f"opsd.teacher.path={other}"]))
    algo = build_algorithm(load_config("opsd_smollm2", [f"model.path={student_dir}", "opsd.teacher.kind=model",
                                                        f"opsd.teacher.path={teacher_dir}"]))
    assert algo.requirements.teacher.kind == "model"
