"""IGPO's hooks in the loop: trigger, inpainting calls, replacement, advantages, hint filter.

The engines and the scorer are replaced by plain functions here, so that every count is known:
`generate` records its calls and returns completions that are correct exactly when their hint
reveals the trace's first token (an obvious rule the test can recompute).
"""
import random

import pytest
import torch

from rl.algorithms import build_algorithm
from rl.algorithms.base import Rollouts, SampledRound
from rl.config import load_config
from rl.core.types import Completion
from tests.unit.test_inpainting import CharTokenizer

G = 8
SOLUTION = "3+4=7 7+5=12"


def igpo(*overrides):
    cfg = load_config(None, [
        "algorithm=igpo", "model.kind=masked_diffusion", "rollout.engine=diffusion", f"igpo.group_size={G}",
        "rollout.max_tokens=40", "igpo.free_tail=4", "igpo.chunk_min=2", "igpo.chunk_max=3", *overrides,
    ])
    algorithm = build_algorithm(cfg)
    algorithm.attach_tokenizer(CharTokenizer())
    return algorithm


def completion(tokens, hint_mask=None):
    return Completion([1, 2], list(tokens), "", [-1.0] * len(tokens), "stop", hint_mask)


class FakeLoop:
    """generate(prompts, spec, hints) and score(completions, rows) as the trainer passes them."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, spec, hints):
        self.calls.append((prompts, spec, hints))
        out = []
        for hint in hints:
            tokens = [hint.get(j, 50) for j in range(12)]
            out.append([completion(tokens, [j in hint for j in range(12)])])
        return out

    @staticmethod
    def right(c: Completion) -> bool:
        return c.hint_mask is not None and c.hint_mask[0]

    def score(self, completions, rows):
        correct = [self.right(c) for c in completions]
        return [3.0 if ok else 0.0 for ok in correct], correct


def sampled_round(correct_per_group):
    rows = [{"problem": f"q{i}", "answer": "12", "solution": SOLUTION} for i in range(len(correct_per_group))]
    groups = [[completion([60 + k, 61]) for k in range(G)] for _ in rows]
    rewards = [[3.0 if ok else 0.0 for ok in group] for group in correct_per_group]
    return SampledRound(rows, [[1, 2]] * len(rows), groups, rewards, [list(g) for g in correct_per_group])


def test_only_all_wrong_groups_are_inpainted_and_replaced_up_to_lambda_g():
    algorithm = igpo("igpo.replace_fraction=0.375")  # floor(0.375 * 8) = 3
    loop = FakeLoop()
    mixed = [True] + [False] * (G - 1)
    sampled = sampled_round([[False] * G, mixed, [False] * G])
    before = [list(g) for g in sampled.completions]
    repair = algorithm.repair_groups(sampled, loop.generate, loop.score)
    generated, repaired = repair.generated, repair.sampled
    assert sampled.completions == before  # the hook returns a new round; the one it was given is intact

    (prompts, spec, hints), = loop.calls  # one batched call for all triggered groups
    assert len(prompts) == 2 * G and spec.n == 1 and len(hints) == 2 * G
    assert len(generated) == 2 * G
    assert repaired.completions[1] == before[1]  # a group with a correct response is left alone
    correct_by_group = [[loop.right(c) for c in generated[k * G:(k + 1) * G]] for k in range(2)]
    for group, inpainted_ok in zip((0, 2), correct_by_group):
        replaced = [c for c in repaired.completions[group] if c not in before[group]]
        assert len(replaced) == min(3, sum(inpainted_ok))
        assert all(loop.right(c) for c in replaced)  # only correct inpainted samples get in
        assert repaired.rewards[group] == [3.0 if c in replaced else 0.0 for c in repaired.completions[group]]
        assert repaired.correct[group] == [c in replaced for c in repaired.completions[group]]
    assert repair.counts["replaced"] == sum(min(3, sum(ok)) for ok in correct_by_group)
    # Both outcomes occurred, so "only correct ones get in" and the lambda cap were both exercised.
    flat = [ok for group in correct_by_group for ok in group]
    assert 3 < sum(flat) < len(flat)


def test_advantages_are_recomputed_on_the_mixed_group_and_metrics_count():
    algorithm = igpo()
    loop = FakeLoop()
    repair = algorithm.repair_groups(sampled_round([[False] * G, [False] * G, [True, False] * (G // 2)]), loop.generate,
                                     loop.score)
    sampled = repair.sampled
    rollouts = Rollouts(sampled.rows, sampled.prompt_ids, sampled.completions, sampled.rewards, repair.counts)
    batch, metrics = algorithm.build_batch(rollouts)
    for g, rewards in enumerate(sampled.rewards):
        mean = sum(rewards) / G
        for k in range(G):
            row = batch.token_fields["advantages"][g * G + k]
            assert row == pytest.approx([rewards[k] - mean] * len(row))  # A = r - mean(r), no std
    still_all_wrong = sum(all(r == 0 for r in rewards) for rewards in sampled.rewards)
    assert metrics["igpo/all_wrong_fraction_before"] == pytest.approx(2 / 3)
    assert metrics["igpo/all_wrong_fraction_after"] == pytest.approx(still_all_wrong / 3)
    assert metrics["igpo/replaced"] == sum(c.hint_mask is not None for group in sampled.completions for c in group)
    assert metrics["igpo/hint_tokens"] == sum(
        sum(c.hint_mask) for group in sampled.completions for c in group if c.hint_mask is not None
    )
    # Nothing is carried between hooks: the counts come with the rollouts, so the same rollouts give
    # the same metrics again.
    _, again = algorithm.build_batch(rollouts)
    assert again == metrics


def test_diffu_grpo_never_inpaints_but_counts_all_wrong_groups():
    cfg = load_config(None, ["algorithm=diffu_grpo", "model.kind=masked_diffusion", "rollout.engine=diffusion",
                             f"diffu_grpo.group_size={G}"])
    loop = FakeLoop()
    sampled = sampled_round([[False] * G, [True] * G])
    repair = build_algorithm(cfg).repair_groups(sampled, loop.generate, loop.score)
    assert repair.sampled is sampled and repair.generated == [] and loop.calls == []
    assert (repair.counts["groups"], repair.counts["all_wrong_before"], repair.counts["all_wrong_after"]) == (2, 1, 1)


def test_hint_filter_keeps_top_entropy_hints_and_every_sampled_token():
    algorithm = igpo("igpo.hint_entropy_fraction=0.25")
    hint_masks = [[True] * 8 + [False] * 4, None, [False, True, True, False, True]]
    completions = [completion(range(len(m or [0] * 6)), m) for m in hint_masks]
    rows = [{"problem": "q", "answer": "1"}] * 3
    rollouts = Rollouts(rows, [[1, 2]] * 3, [completions], [[1.0, 0.0, 0.0]])
    algorithm.cfg = algorithm.cfg.model_copy(update={"group_size": 3})
    batch, _ = algorithm.build_batch(rollouts)
    rng = random.Random(0)
    entropies = [[rng.random() for _ in c.token_ids] for c in completions]
    logprobs = [[-1.0] * len(c.token_ids) for c in completions]
    batch, _ = algorithm.use_policy_scores(batch, logprobs, entropies)
    for mask, hint, entropy in zip(batch.token_fields["loss_mask"], hint_masks, entropies):
        hint = hint or [False] * len(entropy)
        hint_positions = [j for j, h in enumerate(hint) if h]
        keep = max(1, int(0.25 * len(hint_positions))) if hint_positions else 0
        top = sorted(hint_positions, key=lambda j: -entropy[j])[:keep]
        assert mask == [1.0 if (not h or j in top) else 0.0 for j, h in enumerate(hint)]
    assert batch.loss_normalizer == sum(map(sum, batch.token_fields["loss_mask"]))


def test_igpo_needs_a_masked_diffusion_model():
    with pytest.raises(Exception, match="masked_diffusion"):
        build_algorithm(load_config(None, ["algorithm=igpo"]))


def test_sequence_level_ratio_is_one_ratio_per_sequence():
    from rl.algorithms import losses

    logp, old = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], dtype=torch.float32)
    got = losses.sequence_log_ratio(logp, old, mask)
    for i in range(3):
        n = int(mask[i].sum())
        assert got[i, 0].item() == pytest.approx(sum(float(logp[i, t] - old[i, t]) for t in range(n)) / n, abs=1e-6)


def test_llada_recipes_validate_and_fail_offline_naming_the_hub(tmp_path):
    import os
    import subprocess
    import sys

    from rl.core.paths import PROJECT_ROOT

    for recipe in ("igpo_llada", "diffu_grpo_llada"):
        dry = subprocess.run([sys.executable, "-m", "rl.launch", f"recipe={recipe}", "--dry-run", "--print-config"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert dry.returncode == 0, dry.stderr
        assert "GSAI-ML/LLaDA-8B-Instruct" in dry.stdout and "kind: masked_diffusion" in dry.stdout
    real = subprocess.run([sys.executable, "-m", "rl.launch", "recipe=igpo_llada", f"tracking.output_dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert real.returncode == 2, real.stderr[-2000:]
    assert "LLaDA-8B-Instruct" in real.stderr and "hub" in real.stderr and "Traceback" not in real.stderr
