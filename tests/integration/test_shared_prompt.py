"""Shared-prompt group forward, token-budget packing and the training forward's own scores.

The packed layouts (a group's prompt once, then its completions; several units end to end in a
row; micro-batches cut by a token budget) must give what the plain padded layout gives, one row
per sequence: log-probs, entropies, losses, metrics and gradients in float64 through the
learner's own `_Policy` forward, for GRPO with a KL to a reference model, OPSD (teacher view) and
a LoRA model; then the whole DeepSpeed step (float32) ends at the same parameters. At
updates_per_batch=1 the mismatch metrics read from the training forward equal those of the extra
no-grad forward they replace.
"""
import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl.algorithms.grpo import GRPO
from rl.algorithms.opsd import OPSD
from rl.core.batch import MicroBatch, SequenceBatch, packed_tokens, plan_micro_batches
from rl.config import LearnerConfig, LoraConfig, RunConfig
from rl.learner.group import LearnerGroup, LearnerWorker, free_port
from rl.learner.lora import with_lora
from rl.learner.model import _Policy
from rl.learner.step import _call_loss, _token_scores

TEMPERATURE = 0.9
# (prompt length, completion lengths) per group; the last group has one completion (nothing to
# share) and the lengths all differ, so that padding and alignment both matter.
GROUPS = [(5, [3, 7, 1]), (2, [4, 2, 6]), (7, [5]), (3, [2, 2, 8])]
LAYOUTS = {
    "shared": dict(share_prompt=True, max_tokens=None, micro_batch_size=4),
    "unshared-packed": dict(share_prompt=False, max_tokens=30, micro_batch_size=4),
    "shared-token-budget": dict(share_prompt=True, max_tokens=20, micro_batch_size=4),
}
PLAIN = dict(share_prompt=False, max_tokens=None, micro_batch_size=4)


def grouped_batch(seed: int, teacher: bool = False) -> SequenceBatch:
    """GRPO-like fields (advantages, rollout log-probs, loss mask); with `teacher` an OPSD-like
    teacher view whose prompt is per group too, longer than the student's."""
    rng = random.Random(seed)
    ids, prompt_lens, adv, rollout_lp, teacher_ids, teacher_lens = [], [], [], [], [], []
    for p, lens in GROUPS:
        prompt = [rng.randrange(5, 300) for _ in range(p)]
        teacher_prompt = [rng.randrange(5, 300) for _ in range(p + 3)]
        for c in lens:
            completion = [rng.randrange(5, 300) for _ in range(c)]
            ids.append(prompt + completion)
            prompt_lens.append(p)
            teacher_ids.append(teacher_prompt + completion)
            teacher_lens.append(len(teacher_prompt))
            a = rng.uniform(-1, 1)
            adv.append([a] * c)
            rollout_lp.append([rng.uniform(-6, -1) for _ in range(c)])
    n_tokens = sum(sum(lens) for _, lens in GROUPS)
    fields = {"advantages": adv, "rollout_logprobs": rollout_lp, "loss_mask": [[1.0] * len(r) for r in adv]}
    view = dict(teacher_input_ids=teacher_ids, teacher_prompt_lens=teacher_lens) if teacher else {}
    return SequenceBatch(ids, prompt_lens, token_fields=fields, loss_normalizer=float(n_tokens), **view)


def layout(batch: SequenceBatch, share_prompt: bool, max_tokens, micro_batch_size: int,
           view: bool = False) -> list[MicroBatch]:
    """The learner's micro-batches of `batch` (or of the same sequences' teacher views) under a
    layout, as MicroBatcher.micro_batches plans them and _tensors builds them."""
    plan = plan_micro_batches(batch, micro_batch_size, max_tokens, share_prompt)
    packed = share_prompt or max_tokens is not None
    build = partial(MicroBatch.packed, share_prompt=share_prompt) if packed else MicroBatch.from_sequences
    parts = [batch.select(idx) for idx in plan if idx]
    return [build(part.teacher_view() if view else part) for part in parts]


def load64(model_dir, seed: int | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    if seed is not None:  # another model than the policy (a reference, a teacher)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def rows(values: torch.Tensor, mb: MicroBatch) -> list[torch.Tensor]:
    return [row[: int(n)] for row, n in zip(values, mb.completion_mask.sum(-1))]


def run_step(policy: _Policy, batch: SequenceBatch, loss_fn, lay: dict, reference: _Policy | None = None,
             teacher: _Policy | None = None):
    """Scores, loss, metrics and gradients of one step over the layout's micro-batches, as the
    learner runs it: reference scores first, teacher hidden states per micro-batch."""
    if reference is not None:
        with torch.no_grad():
            ref = [lp for mb in layout(batch, **lay) for lp in rows(reference(mb=mb, fn=partial(_token_scores, mb, TEMPERATURE, False))[0], mb)]
        batch.token_fields["ref_logprobs"] = [r.tolist() for r in ref]
    with torch.no_grad():
        scores = [(lp, ent) for mb in layout(batch, **lay)
                  for lp, ent in zip(*[rows(t, mb) for t in policy(mb=mb, fn=partial(_token_scores, mb, TEMPERATURE, True))])]
    policy.zero_grad()
    student = layout(batch, **lay)
    views = layout(batch, **lay, view=True) if teacher is not None else [None] * len(student)
    total, metrics, kept = 0.0, {}, []
    for mb, view in zip(student, views):
        teacher_hidden = None
        if view is not None:
            assert torch.equal(view.completion_ids, mb.completion_ids)
            with torch.no_grad():
                teacher_hidden = teacher(mb=view)
        teacher_weight = None if teacher is None else teacher.output_weight.detach()
        fn = partial(_call_loss, loss_fn, mb, TEMPERATURE, teacher_hidden, teacher_weight)
        loss, part, kept_lp = policy(mb=mb, fn=fn)
        loss.backward()
        total += loss.item()
        for k, v in part.items():
            metrics[k] = metrics.get(k, 0.0) + v
        if kept_lp is not None:
            kept += rows(kept_lp, mb)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return SimpleNamespace(scores=scores, loss=total, metrics=metrics, grads=grads, kept=kept)


def assert_same_step(got, want, atol=1e-10):
    assert len(got.scores) == len(want.scores)
    for (lp, ent), (lp0, ent0) in zip(got.scores, want.scores):
        torch.testing.assert_close(lp, lp0, atol=atol, rtol=0)
        torch.testing.assert_close(ent, ent0, atol=atol, rtol=0)
    # Losses and metrics are float32 sums (rl.algorithms.losses), split differently over micro-batches.
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert got.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert got.metrics[k] == pytest.approx(want.metrics[k], rel=1e-6), k
    assert got.grads.keys() == want.grads.keys() and want.grads
    # The losses take log-softmax in float32 (rl.algorithms.losses), so gradients that sum a shared prompt's
    # contributions in another order differ at float32's ~1e-7 relative level, no more.
    scale = max(g.abs().max().item() for g in want.grads.values())
    assert scale > 1e-3  # gradients that mean something
    for name, g in want.grads.items():
        torch.testing.assert_close(got.grads[name], g, atol=1e-6 * scale, rtol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Layout and planning


def test_plan_respects_the_token_budget_and_counts_a_shared_prompt_once():
    batch = grouped_batch(0)
    for share in (True, False):
        plan = plan_micro_batches(batch, 4, 20, share)
        assert [i for run in plan for i in run] == list(range(len(batch)))  # every sequence once, in order
        for run in plan:
            cost = packed_tokens(batch.select(run), share)
            assert cost <= 20 or len(run) == 1
    # Group 0 is 5 + 3 + 7 + 1 = 16 tokens shared; unshared, two more copies of its prompt.
    assert packed_tokens(batch.select([0, 1, 2]), True) == 16
    assert packed_tokens(batch.select([0, 1, 2]), False) == 26
    assert plan_micro_batches(batch, 4, 16, True)[0] == [0, 1, 2]
    assert plan_micro_batches(batch, 4, 15, True)[0] == [0, 1]
    # An explicit count pads with empty runs (placeholders), a sequence count splits evenly.
    assert plan_micro_batches(batch, 4, 1000, True, count=3) == [list(range(len(batch))), [], []]
    assert plan_micro_batches(batch, 4, None, True) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_ranks_agree_on_the_micro_batch_count_under_a_token_budget():
    batch = grouped_batch(0)
    cfg = LearnerConfig(num_learners=2, max_tokens_per_micro_batch=12, share_prompt=True)
    group = SimpleNamespace(cfg=cfg, workers=[None, None])
    shards, count = LearnerGroup._shards(group, batch)
    assert count == max(len(plan_micro_batches(s, 4, 12, True)) for s in shards) > 1
    # The shorter shard is padded with placeholders up to the common count.
    assert all(len(plan_micro_batches(s, 4, 12, True, count=count)) == count for s in shards)


def test_packed_layout_shares_prompts_and_pads_little():
    batch = grouped_batch(0)
    mb = MicroBatch.packed(batch, share_prompt=True)
    shared = sum(p for p, _ in GROUPS)
    completions = sum(sum(lens) for _, lens in GROUPS)
    assert int((mb.input_ids != 0).sum()) <= shared + completions  # random ids are never 0 (pad)
    assert mb.input_ids.numel() < MicroBatch.from_sequences(batch).input_ids.numel()
    # A completion sees its prompt and itself, never a sibling completion.
    att = mb.attention_mask[0, 0]
    p, (c0, _, _) = GROUPS[0][0], GROUPS[0][1]
    assert att[p + c0, :p].all() and att[p + c0, p + c0] and not att[p + c0, p : p + c0].any()
    assert mb.position_ids[0, p + c0].item() == p  # positions restart after the prompt


# ---------------------------------------------------------------------------------------------
# float64 equality through _Policy


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grpo_with_kl_equals_the_plain_layout(tiny_model, name):
    algo = GRPO(RunConfig(grpo={"group_size": 3, "kl_coef": 0.1, "clip_high": 0.2}))
    policy, reference = _Policy(load64(tiny_model)), _Policy(load64(tiny_model, seed=1))
    want = run_step(policy, grouped_batch(0), algo.loss, PLAIN, reference=reference)
    got = run_step(policy, grouped_batch(0), algo.loss, LAYOUTS[name], reference=reference)
    assert_same_step(got, want)
    assert want.metrics["kl_sum"] > 1e-3  # the reference differs: the KL term is really there
    # The kept log-probs (what replaces the no-grad forward) are the scores of the current policy.
    for kept, (lp, _) in zip(got.kept, want.scores):
        torch.testing.assert_close(kept, lp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["shared", "shared-token-budget"])
def test_opsd_with_its_teacher_view_equals_the_plain_layout(tiny_model, name):
    algo = OPSD(RunConfig(algorithm="opsd"))
    policy, teacher = _Policy(load64(tiny_model)), _Policy(load64(tiny_model, seed=2))
    want = run_step(policy, grouped_batch(0, teacher=True), algo.loss, PLAIN, teacher=teacher)
    got = run_step(policy, grouped_batch(0, teacher=True), algo.loss, LAYOUTS[name], teacher=teacher)
    assert_same_step(got, want)
    assert want.metrics["divergence_sum"] > 1e-3


def test_lora_model_equals_the_plain_layout(tiny_model):
    algo = GRPO(RunConfig(grpo={"group_size": 3}))
    torch.manual_seed(0)
    lm = with_lora(load64(tiny_model), LoraConfig(enabled=True, rank=4, alpha=8.0))
    with torch.no_grad():  # B starts at 0: give the adapters a value so that A's gradient is not 0
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    policy = _Policy(lm)
    want = run_step(policy, grouped_batch(0), algo.loss, PLAIN)
    got = run_step(policy, grouped_batch(0), algo.loss, LAYOUTS["shared"])
    assert_same_step(got, want)
    assert all("lora_" in n for n in want.grads)


def test_plain_reference_differs_from_a_wrong_mask(tiny_model):
    """The comparison can fail: a completion that sees its siblings, or its own future, scores
    differently, through the 4D mask (eager/flash models) and through piece attention alike."""
    policy = _Policy(load64(tiny_model))
    assert policy.piece_attention  # an SDPA model runs the packed layout as pieces
    batch = grouped_batch(0)
    plain = MicroBatch.from_sequences(batch)
    fn = partial(_token_scores, plain, TEMPERATURE, False)

    def scores(mb, pieces: bool):
        policy.piece_attention = pieces
        with torch.no_grad():
            return policy(mb=mb, fn=fn)[0] * plain.completion_mask

    want = scores(plain, True)
    for pieces in (True, False):
        torch.testing.assert_close(scores(MicroBatch.packed(batch, share_prompt=True), pieces), want, atol=1e-10, rtol=0)
    mb = MicroBatch.packed(batch, share_prompt=True)
    mb.attention_mask = torch.ones_like(mb.attention_mask).tril()
    assert (scores(mb, False) - want).abs().max() > 1e-3
    mb = MicroBatch.packed(batch, share_prompt=True)
    completions = mb.attention_pieces.groups[1]
    completions.mask |= torch.ones_like(completions.mask)  # every key of the piece, the future too
    assert (scores(mb, True) - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The DeepSpeed step, float32


GRAD_SCALE = 1e4  # gradient elements far above Adam's eps, so the steps compare tightly (test_learner)


@pytest.mark.slow
def test_learner_step_and_training_scores_match_across_layouts(tiny_model):
    cfg = RunConfig(grpo={"group_size": 3, "kl_coef": 0.1})
    algo = GRPO(cfg)
    assert not algo._scores_before_update()  # mu = 1, no filter: the training forward's scores serve (no extra forward)

    def step(**learner):
        worker = LearnerWorker(
            str(tiny_model), LearnerConfig(lr=1e-3, max_grad_norm=1e3, micro_batch_size=4, **learner), "float32",
            0, 1, "127.0.0.1", free_port(), 0, 10, with_reference=True,
        )
        batch = grouped_batch(0)
        batch.loss_normalizer /= GRAD_SCALE
        batch.token_fields["ref_logprobs"], _ = worker.compute_logprobs(batch, TEMPERATURE, reference=True)
        # The old path: a no-grad forward before the step feeds the mismatch metrics.
        before = worker.compute_logprobs(batch, TEMPERATURE)[0]
        _, old_metrics = algo.use_policy_scores(batch, before, None)
        metrics, kept = worker.train_step(batch, algo.loss, TEMPERATURE, return_logprobs=True)
        _, new_metrics = algo.use_policy_scores(batch, kept, None)
        return SimpleNamespace(metrics=metrics, old=old_metrics, new=new_metrics, state=worker.full_state_dict(),
                               kept=kept, before=before)

    plain = step(share_prompt=False)
    assert plain.new.keys() == plain.old.keys() and "mismatch/logprob_gap_mean" in plain.new
    for k, v in plain.old.items():
        assert plain.new[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    for layout_kw in (dict(share_prompt=True), dict(share_prompt=True, max_tokens_per_micro_batch=20)):
        got = step(**layout_kw)
        for k in ("loss", "kl_sum", "entropy_sum", "tokens", "grad_norm"):
            assert got.metrics[k] == pytest.approx(plain.metrics[k], rel=1e-5), k
        for k, v in plain.new.items():
            assert got.new[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        for name, value in plain.state.items():
            torch.testing.assert_close(got.state[name], value, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
        initial = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).state_dict()
        assert max((plain.state[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # the step moved


def test_sliding_window_model_is_refused_on_the_packed_layout(tiny_model, tmp_path):
    import shutil

    from transformers import AutoConfig

    folder = tmp_path / "sliding"
    shutil.copytree(tiny_model, folder)
    config = AutoConfig.from_pretrained(str(folder))
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention", "full_attention"]
    config.save_pretrained(str(folder))
    with pytest.raises(ValueError, match="sliding-window attention layers.*learner.share_prompt=false"):
        LearnerWorker(str(folder), LearnerConfig(), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10)
    # Unpacked, the same model trains as before.
    LearnerWorker(str(folder), LearnerConfig(share_prompt=False), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10)
