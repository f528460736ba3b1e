"""OPSD and OPD for a masked-diffusion student (issue 27 §3): the teacher scores the student's answer
positions through the learner's estimator (d1's one step: its prompt, then every answer position
masked), and the divergence over those positions equals a float64 computation written here from
both models' logits, for another diffusion model as teacher and for the student's frozen self shown
a privileged prompt."""
import random

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from rl.algorithms.opsd import DistillationLoss, TeacherConfig
from rl.config import LearnerConfig
from rl.core.batch import SequenceBatch
from rl.demo.tiny import build_diffusion_model
from rl.learner.group import DiffusionForward, LearnerWorker, free_port

pytestmark = pytest.mark.slow

ANSWER_LEN = 6
SHAPES = [(3, 5, 7), (2, 2, 4), (4, 6, 2)]  # (student prompt, completion, teacher prompt)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("opsd_dllm")
    return build_diffusion_model(root / "student", seed=0), build_diffusion_model(root / "teacher", seed=4)


def make_batch(seed: int, vocab: int) -> SequenceBatch:
    rng = random.Random(seed)
    ids, lens, tids, tlens = [], [], [], []
    for p, c, tp in SHAPES:
        completion = [rng.randrange(5, vocab - 1) for _ in range(c)]
        ids.append([rng.randrange(5, vocab - 1) for _ in range(p)] + completion)
        tids.append([rng.randrange(5, vocab - 1) for _ in range(tp)] + completion)
        lens.append(p)
        tlens.append(tp)
    return SequenceBatch(ids, lens, loss_normalizer=float(sum(c for _, c, _ in SHAPES)),
                         teacher_input_ids=tids, teacher_prompt_lens=tlens)


def answer_logits(model, prompt: list[int], n: int, mask_id: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + [mask_id] * ANSWER_LEN])).logits[0]
    return logits[len(prompt) : len(prompt) + n].double()


def reference_sum(student, teacher, batch: SequenceBatch, loss: DistillationLoss, mask_id: int) -> float:
    total = 0.0
    for ids, p, tids, tp in zip(batch.input_ids, batch.prompt_lens, batch.teacher_input_ids, batch.teacher_prompt_lens):
        n = len(ids) - p
        ls = answer_logits(student, ids[:p], n, mask_id).log_softmax(-1)
        lt = answer_logits(teacher, tids[:tp], n, mask_id).log_softmax(-1)
        if loss.token_loss == "sampled":
            tokens = torch.tensor(ids[p:])[:, None]
            a, b = ls.gather(-1, tokens), lt.gather(-1, tokens)
            total += float((-(b - a) * a).sum())
        else:
            total += float((lt.exp() * (lt - ls)).sum())
    return total


def distill(token_loss: str) -> DistillationLoss:
    return DistillationLoss(token_loss=token_loss, divergence="forward_kl", jsd_beta=0.5, clip=None, top_k=5,
                            chunk_size=4, aggregation="token_mean")


@pytest.mark.parametrize("kind", ["model", "frozen"])
def test_diffusion_student_distillation_loss_matches_both_models_logits(models, kind):
    student_dir, teacher_dir = models
    mask_id = AutoTokenizer.from_pretrained(str(student_dir)).mask_token_id
    teacher = TeacherConfig(kind=kind, path=str(teacher_dir) if kind == "model" else None)
    worker = LearnerWorker(str(student_dir), LearnerConfig(lr=1e-2, micro_batch_size=2, warmup_steps=0), "float32",
                           0, 1, "127.0.0.1", free_port(), 0, 10, teacher=teacher,
                           diffusion=DiffusionForward(ANSWER_LEN, mask_id))
    teacher_model = AutoModelForMaskedLM.from_pretrained(str(teacher_dir if kind == "model" else student_dir))
    vocab = teacher_model.config.vocab_size
    for step, token_loss in enumerate(["full", "sampled", "full"]):
        batch, loss = make_batch(step, vocab), distill(token_loss)
        student = AutoModelForMaskedLM.from_pretrained(str(student_dir))
        student.load_state_dict(worker.full_state_dict())  # the weights this step starts from
        want = reference_sum(student, teacher_model, batch, loss, mask_id)
        metrics = worker.train_step(batch, loss, 1.0, num_micro_batches=2)
        assert metrics["divergence_sum"] == pytest.approx(want, rel=1e-5, abs=1e-6), (kind, token_loss)
    moved = worker.full_state_dict()
    assert any((moved[k] - v).abs().max() > 1e-4 for k, v in AutoModelForMaskedLM.from_pretrained(str(student_dir)).state_dict().items()
               if k in moved and v.dtype.is_floating_point)


def passes_reference_sum(student, teacher, batch: SequenceBatch, estimator: str, n: int, mask_id: int) -> float:
    """Forward KL over the estimator's passes, row by row: both models see the student's tokens where
    the pass leaves them, the mask elsewhere; each masked token's KL weighted by the pass's weight."""
    from rollouts.estimators.rows import stacked_passes

    total = 0.0
    for ids, p, tids, tp in zip(batch.input_ids, batch.prompt_lens, batch.teacher_input_ids, batch.teacher_prompt_lens):
        completion = ids[p:]
        for masked, weight in stacked_passes(estimator, [ids[:p]], [completion], [0], n=n, width=len(completion)):
            answer = [mask_id if m else t for m, t in zip(masked[0].tolist(), completion)]
            answer += [mask_id] * (ANSWER_LEN - len(answer))
            with torch.no_grad():
                ls = student(input_ids=torch.tensor([ids[:p] + answer])).logits[0, p : p + len(completion)].double().log_softmax(-1)
                lt = teacher(input_ids=torch.tensor([tids[:tp] + answer])).logits[0, tp : tp + len(completion)].double().log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            total += float((weight[0] * kl * masked[0]).sum())
    return total


@pytest.mark.parametrize("estimator,n", [("mc_elbo", 3), ("coupled", 1)])
def test_diffusion_distillation_over_estimator_passes_matches_a_row_by_row_reference(models, estimator, n):
    """On mc_elbo/coupled the teacher scores the student's masked positions given the student's other
    tokens (on-policy), not the all-masked guess of one_step."""
    student_dir, teacher_dir = models
    mask_id = AutoTokenizer.from_pretrained(str(student_dir)).mask_token_id
    worker = LearnerWorker(str(student_dir), LearnerConfig(lr=1e-2, micro_batch_size=2, warmup_steps=0), "float32",
                           0, 1, "127.0.0.1", free_port(), 0, 10, teacher=TeacherConfig(kind="model", path=str(teacher_dir)),
                           diffusion=DiffusionForward(ANSWER_LEN, mask_id, estimator=estimator, estimator_samples=n))
    teacher_model = AutoModelForMaskedLM.from_pretrained(str(teacher_dir))
    vocab = teacher_model.config.vocab_size
    one_step_totals = []
    for step in range(2):
        batch = make_batch(step, vocab)
        student = AutoModelForMaskedLM.from_pretrained(str(student_dir))
        student.load_state_dict(worker.full_state_dict())
        want = passes_reference_sum(student, teacher_model, batch, estimator, n, mask_id)
        one_step_totals.append(reference_sum(student, teacher_model, batch, distill("full"), mask_id))
        metrics = worker.train_step(batch, distill("full"), 1.0, num_micro_batches=2)
        assert metrics["divergence_sum"] == pytest.approx(want, rel=1e-5, abs=1e-6), (estimator, step)
        assert abs(want - one_step_totals[-1]) > 1e-3  # not the all-masked comparison under another name


def test_opsd_trains_a_diffusion_student_end_to_end(ray_session, models, tmp_path):
    """train(): the diffusion engine samples, the frozen student shown the reference solution is the
    teacher, the learner runs the full-vocabulary divergence over the masked answer positions."""
    import json

    from rl.config import load_config
    from rl.loop.trainer import train

    student_dir, _ = models
    cfg = load_config(None, [
        "algorithm=opsd", "plugins=[rl.demo.tiny]", f"model.path={student_dir}", "model.kind=masked_diffusion",
        "data.train=synthetic:chain_addition", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.engine=diffusion", "rollout.max_tokens=16", "rollout.diffusion.block_length=8", "rollout.diffusion.steps=4",
        "opsd.teacher.kind=frozen", "opsd.clip=null", "opsd.teacher_template='{solution} {problem}'",
        "reward.functions=[{name: math_verify}]", "train.steps=2", "train.prompts_per_step=8",
        "learner.micro_batch_size=8", "learner.lr=1e-3", "train.save_final=false",
        f"tracking.output_dir={tmp_path}", "tracking.run_name=run"])
    (tmp_path / "run").mkdir()
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["teacher_prompt_length"] > 16  # the solution and the problem: longer than any student prompt
        assert r["loss"] > 0 and r["opsd/kl_reasoning"] == r["opsd/kl_reasoning"]  # a divergence, finite
