"""A teacher on engines of its own (opsd.teacher.runs_on=engines): what the config refuses, and the
loss on the engines' log-probs against a plain reference and against the same loss with the
teacher's hidden states on the learner."""
import pytest
import torch

from rl.algorithms.opsd import TEACHER_LOGPROBS, TEACHER_TOP_IDS, TEACHER_TOP_LOGPROBS, DistillationLoss, OPSDConfig
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch

LENS = [3, 5, 1]
HIDDEN, VOCAB = 5, 11
ENGINES = {"kind": "model", "path": "teacher", "runs_on": "engines"}


def random_student_and_teacher(seed: int):
    """Completion tokens, the student's hidden states and output weight, the teacher's (float64)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENS]
    hidden = torch.randn(len(LENS), max(LENS), HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    t_weight = torch.randn(weight.shape, generator=g, dtype=torch.float64)
    return tokens, hidden, weight, t_hidden, t_weight


@pytest.mark.parametrize("settings, says", [
    ({"token_loss": "full"}, "Set opsd.token_loss=sampled or top_k"),
    ({"token_loss": "sampled", "scale_logits_by_temperature": True}, "engines score at temperature 1"),
    ({"token_loss": "sampled", "teacher": {"kind": "frozen", "runs_on": "engines"}}, "set opsd.teacher.kind=model"),
    ({"teacher": {"kind": "model", "path": "t", "by_tag": {"b": "u"}}}, "set opsd.teacher.runs_on=engines"),
])
def test_what_a_teacher_on_engines_cannot_do_is_refused(settings, says):
    with pytest.raises(ValueError, match=says):
        OPSDConfig(**{"teacher": ENGINES, **settings})
    OPSDConfig(teacher=ENGINES, token_loss="sampled")
    OPSDConfig(teacher=ENGINES, token_loss="top_k")
    OPSDConfig(teacher=ENGINES, mode="rlsd", group_size=4)  # RLSD reads only the sampled tokens' log-probs


def test_the_loss_on_engine_log_probs_equals_the_loss_on_the_teachers_hidden_states():
    tokens, hidden, weight, t_hidden, t_weight = random_student_and_teacher(seed=1)
    teacher_lp = [[torch.log_softmax(t_weight @ t_hidden[i, t], -1)[tok].item() for t, tok in enumerate(toks)]
                  for i, toks in enumerate(tokens)]
    loss_fn = DistillationLoss.from_config(OPSDConfig(teacher=ENGINES, token_loss="sampled", chunk_size=2, aggregation="code"))

    def run(fields, teacher):
        batch = SequenceBatch([[1] + t for t in tokens], [1] * len(LENS), token_fields=fields,
                              loss_normalizer=float(sum(LENS)))
        mb = MicroBatch.from_sequences(batch)
        mb.token_fields = {k: v.double() for k, v in mb.token_fields.items()}
        h = hidden.clone().requires_grad_(True)
        loss, metrics = loss_fn(PolicyOutputs(h, weight, 1.0, *teacher), mb)
        loss.backward()
        return loss, h.grad, metrics

    loss, grad, metrics = run({TEACHER_LOGPROBS: teacher_lp}, ())
    on_learner, learner_grad, _ = run({}, (t_hidden, t_weight))
    # Plain reference: -sum_t (log p_T(y_t) - log p_S(y_t)).detach() * log p_S(y_t), over all tokens.
    rh = hidden.clone().requires_grad_(True)
    total = 0.0
    for i, toks in enumerate(tokens):
        for t, tok in enumerate(toks):
            s_lp = torch.log_softmax(weight @ rh[i, t], -1)[tok]
            total = total - (teacher_lp[i][t] - s_lp.detach()) * s_lp
    (total / sum(LENS)).backward()
    assert loss.item() == pytest.approx(total.item() / sum(LENS), rel=1e-6)
    torch.testing.assert_close(grad, rh.grad, atol=1e-6, rtol=1e-5)
    assert loss.item() == pytest.approx(on_learner.item(), rel=1e-6)
    torch.testing.assert_close(grad, learner_grad, atol=1e-6, rtol=1e-5)
    assert metrics["kl_reasoning_total"] == pytest.approx(
        sum(-lp for row in teacher_lp for lp in row) + float(sum(
            torch.log_softmax(weight @ hidden[i, t], -1)[tok] for i, toks in enumerate(tokens) for t, tok in enumerate(toks))),
        rel=1e-5)


@pytest.mark.parametrize("divergence, clip", [("forward_kl", 0.05), ("reverse_kl", None), ("jsd", None)])
def test_the_top_k_loss_on_engine_log_probs_equals_the_top_k_loss_on_the_teachers_hidden_states(divergence, clip):
    """The engines give each position's k most likely ids and their log-probs: the loss renormalised over
    them equals token_loss=top_k with the teacher's full logits on the learner, in value and gradient."""
    k = 4
    tokens, hidden, weight, t_hidden, t_weight = random_student_and_teacher(seed=2)
    teacher_logp = torch.log_softmax(t_hidden @ t_weight.T, -1)
    top = teacher_logp.topk(k, dim=-1)
    rows = lambda x: [x[i, :n].tolist() for i, n in enumerate(LENS)]  # noqa: E731
    engine_fields = {TEACHER_TOP_IDS: rows(top.indices), TEACHER_TOP_LOGPROBS: rows(top.values),
                     TEACHER_LOGPROBS: rows(teacher_logp.gather(-1, torch.tensor(
                         [t + [0] * (max(LENS) - len(t)) for t in tokens])[..., None])[..., 0])}
    settings = dict(token_loss="top_k", top_k=k, divergence=divergence, clip=clip, chunk_size=2, aggregation="code")
    on_engines = DistillationLoss.from_config(OPSDConfig(teacher=ENGINES, **settings))
    on_learner = DistillationLoss.from_config(OPSDConfig(**settings))

    def run(loss_fn, fields, teacher):
        batch = SequenceBatch([[1] + t for t in tokens], [1] * len(LENS), token_fields=fields,
                              loss_normalizer=float(sum(LENS)))
        mb = MicroBatch.from_sequences(batch)
        mb.token_fields = {name: v.double() for name, v in mb.token_fields.items()}
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, metrics = loss_fn(PolicyOutputs(h, w, 1.0, *teacher), mb)
        loss.backward()
        return loss, h.grad, w.grad, metrics

    loss, h_grad, w_grad, metrics = run(on_engines, engine_fields, ())
    want, want_h, want_w, want_metrics = run(on_learner, {}, (t_hidden, t_weight))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and abs(loss.item()) > 1e-3
    torch.testing.assert_close(h_grad, want_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w_grad, want_w, atol=1e-6, rtol=1e-5)
    assert metrics["kl_reasoning_total"] == pytest.approx(want_metrics["kl_reasoning_total"], rel=1e-5)


def test_an_estimator_of_several_passes_is_refused_where_it_cannot_apply():
    from rl.algorithms import build_algorithm
    from rl.config import load_config

    with pytest.raises(ValueError, match="leave opsd.estimator=one_step"):  # a causal student
        build_algorithm(load_config(None, ["algorithm=opsd", "opsd.estimator=mc_elbo"]))
    diffusion = ["algorithm=opsd", "model.kind=masked_diffusion", "rollout.engine=diffusion", "opsd.estimator=coupled"]
    with pytest.raises(ValueError, match="set opsd.teacher.runs_on=learner"):  # the engines cannot see the learner's masks
        build_algorithm(load_config(None, [*diffusion, "opsd.teacher.kind=model", "opsd.teacher.path=t",
                                           "opsd.teacher.runs_on=engines", "opsd.token_loss=sampled"]))
    assert build_algorithm(load_config(None, diffusion)).requirements.estimator == "coupled"
