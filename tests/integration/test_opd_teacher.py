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


def completion_logits(model, ids, prompt_len, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, prompt_len - 1 : len(ids) - 1]
    return logits.double() / temperature


def reference_sum(student, teacher, batch: SequenceBatch, loss: DistillationLoss, temperature=TEMPERATURE) -> float:
    """The step's summed per-token loss, written out in float64 from both models' full logits."""
    total = 0.0
    for ids, p, tids, tp in zip(batch.input_ids, batch.prompt_lens, batch.teacher_input_ids, batch.teacher_prompt_lens):
        s, t = completion_logits(student, ids, p, temperature), completion_logits(teacher, tids, tp, temperature)
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


def test_a_teacher_on_engines_of_its_own_scores_what_the_learner_would(ray_session, pair, tmp_path):
    """opsd.teacher.runs_on=engines: vLLM engines holding the teacher score the teacher views
    (OPSD.prepare puts the log-probs, or the top k, in the batch), and the learner, which holds no
    teacher, runs the sampled-token or top-k loss on them: the same sum as the float64 reference
    from both models' logits."""
    from rl.algorithms.opsd import OPSD, TEACHER_LOGPROBS, TEACHER_TOP_IDS
    from rollouts.pool import RolloutPool

    student_dir, teacher_dir = pair
    algos = {token_loss: OPSD(load_config(None, [
        f"model.path={student_dir}", "algorithm=opsd", f"opsd.token_loss={token_loss}", "opsd.top_k=5",
        "opsd.clip=null", "opsd.aggregation=code", "opsd.teacher.kind=model", f"opsd.teacher.path={teacher_dir}",
        "opsd.teacher.runs_on=engines"])) for token_loss in ("sampled", "top_k")}
    assert algos["sampled"].requirements.teacher is None
    assert [(e.name, e.model_path) for e in algos["sampled"].requirements.scoring_engines] == [
        ("opsd.teacher.path", str(teacher_dir))]
    batches = {name: make_batch(5 + i) for i, name in enumerate(algos)}
    engines = RolloutPool("vllm", str(teacher_dir), num_engines=1, max_model_len=64, kv_cache_gb=0.05)
    try:
        prepared = {}
        for name, algo in algos.items():
            algo.attach_scoring_engines({"opsd.teacher.path": engines})
            prepared[name], _ = algo.prepare(batches[name], learner=None)
    finally:
        engines.close()
    assert prepared["sampled"].teacher_input_ids is None
    assert [len(x) for x in prepared["sampled"].token_fields[TEACHER_LOGPROBS]] == [c for _, c, _ in SHAPES]
    assert {len(ids) for row in prepared["top_k"].token_fields[TEACHER_TOP_IDS] for ids in row} == {5}
    worker = LearnerWorker(str(student_dir), LearnerConfig(lr=1e-2, micro_batch_size=2, warmup_steps=0), "float32",
                           0, 1, "127.0.0.1", free_port(), 0, 10)
    for name, algo in algos.items():
        student = load(student_dir, worker.full_state_dict())  # the weights this step starts from
        want = reference_sum(student, load(teacher_dir), batches[name], algo.loss, temperature=1.0)  # engines: T 1
        metrics = worker.train_step(prepared[name], algo.loss, 1.0, num_micro_batches=2)
        assert metrics["divergence_sum"] == pytest.approx(want, rel=1e-4, abs=1e-5), name


def test_opd_with_the_teacher_on_engines_trains_like_the_teacher_on_the_learner(ray_session, tiny_model,
                                                                                warmed_addition_model, tmp_path, capfd):
    """train() end to end, plain OPD from the warmed model into the random one: the teacher on an
    engine of its own (in the resource plan) gives the same losses as the teacher on the learner rank."""
    import json

    from rl.demo.tiny import addition_rows
    from rl.loop.trainer import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64, seed=2)))

    def run(where: str) -> list[dict]:
        cfg = load_config(None, [
            f"model.path={tiny_model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
            "algorithm=opsd", "opsd.token_loss=sampled", "opsd.teacher.kind=model",
            f"opsd.teacher.path={warmed_addition_model}", "opsd.teacher.privileged=false", f"opsd.teacher.runs_on={where}",
            "rollout.max_tokens=6", "rollout.kv_cache_gb=0.25", "train.steps=3", "train.prompts_per_step=8",
            "learner.micro_batch_size=8", "learner.lr=1e-3", "train.save_final=false",
            f"tracking.output_dir={tmp_path}", f"tracking.run_name={where}"])
        (tmp_path / where).mkdir()
        train(cfg, tmp_path / where)
        return [json.loads(line) for line in (tmp_path / where / "metrics.jsonl").read_text().splitlines()]

    on_engines = run("engines")
    plan = capfd.readouterr().err
    assert "  teacher  0  node" in plan and "bundles [{CPU: 1}, {CPU: 1}, {CPU: 1}]" in plan, plan
    on_learner = run("learner")
    assert "teacher  0" not in capfd.readouterr().err
    for a, b in zip(on_engines, on_learner):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-5)
        assert a["opsd/kl_reasoning"] == pytest.approx(b["opsd/kl_reasoning"], rel=1e-3, abs=1e-5)
    assert on_engines[0]["opsd/kl_reasoning"] > 0.05  # the two models disagree: there is something to distil


def test_several_teachers_by_tag_each_score_their_own_rows(ray_session, pair, tmp_path):
    """opsd.teacher.by_tag: rows tagged `b` go to teacher B's engine, every other row to the default
    teacher's; each completion's teacher log-probs are its own teacher's, and the two teachers
    disagree, so routing a row to the wrong one would show."""
    from transformers import AutoTokenizer

    from rl.algorithms import Rollouts
    from rl.algorithms.opsd import OPSD, TEACHER_INDEX, TEACHER_LOGPROBS
    from rl.core.types import Completion
    from rollouts.pool import RolloutPool

    student_dir, teacher_a = pair
    teacher_b = build_model(tmp_path / "teacher_b", arch="llama", tied=False, hidden=96, seed=11)
    cfg = load_config(None, [f"model.path={student_dir}", "algorithm=opsd", "opsd.token_loss=sampled",
                             "opsd.teacher.kind=model", f"opsd.teacher.path={teacher_a}", "opsd.teacher.runs_on=engines",
                             "opsd.teacher.privileged=false", f"opsd.teacher.by_tag={{b: {teacher_b}}}"])
    algo = OPSD(cfg)
    assert [e.model_path for e in algo.requirements.scoring_engines] == [str(teacher_a), str(teacher_b)]
    tok = AutoTokenizer.from_pretrained(student_dir)
    algo.attach_tokenizer(tok)
    rows = [{"problem": f"{i}+{i}=", "answer": str(2 * i), "source": tag} for i, tag in enumerate(["a", "b", None, "b"])]
    prompts = [tok.encode(r["problem"]) for r in rows]
    completions = [[Completion(p, tok.encode(f"{i} {i} =")[:4], "", [], "stop")] for i, p in enumerate(prompts)]
    batch, _ = algo.build_batch(Rollouts(rows, prompts, completions, [[0.0]] * 4))
    assert batch.seq_fields[TEACHER_INDEX] == [0.0, 1.0, 0.0, 1.0]
    pools = {name: RolloutPool("vllm", str(path), max_model_len=64, kv_cache_gb=0.05)
             for name, path in [("opsd.teacher.path", teacher_a), ("opsd.teacher.by_tag.b", teacher_b)]}
    try:
        algo.attach_scoring_engines(pools)
        prepared, _ = algo.prepare(batch, learner=None)
    finally:
        for pool in pools.values():
            pool.close()
    models = {"a": load(teacher_a), "b": load(teacher_b)}
    for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
        tokens = torch.tensor(ids[p:])[:, None]
        own, other = ("b", "a") if rows[i]["source"] == "b" else ("a", "b")
        want = completion_logits(models[own], ids, p, 1.0).log_softmax(-1).gather(-1, tokens).squeeze(-1)
        wrong = completion_logits(models[other], ids, p, 1.0).log_softmax(-1).gather(-1, tokens).squeeze(-1)
        got = torch.tensor(prepared.token_fields[TEACHER_LOGPROBS][i], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - wrong).abs().max() > 0.1  # the teachers disagree
