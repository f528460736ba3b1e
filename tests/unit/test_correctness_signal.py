"""The correctness signal is a declared reward, never "total reward > 0".

Each shipped recipe's own reward set grades a well-formatted wrong answer as wrong and a right one
as right; algorithms that read correctness refuse a reward set without a correctness reward; IGPO's
all-wrong trigger and its replacements follow the correctness reward, not the total.
"""

import pytest

from rl.algorithms import build_algorithm
from rl.config import load_config
from rl.core.paths import RECIPES_DIR
from rewards import register_reward
from rewards.scoring import RewardError, RewardScorer, correctness_index
from tests.unit.test_igpo import FakeLoop, G, igpo, sampled_round

# Completions in the format each recipe's prompt asks for, answering 5 where the gold is 7 (wrong)
# or 7 (right): a format bonus must not make the wrong one right.
XML = "<reasoning>\n2+5 makes {x}.\n</reasoning>\n<answer>\n\\boxed{{{x}}}\n</answer>\n"
PLAIN = "Adding the two numbers gives {x}. The answer is \\boxed{{{x}}}."
# d1's prompt asks for the bare answer in the tag (no box).
XML_BARE = "<reasoning>\n2+5 makes {x}.\n</reasoning>\n<answer>\n{x}\n</answer>\n"


def _rl_recipes():
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if load_config(p.stem).algorithm != "sft")


@pytest.mark.parametrize("recipe", _rl_recipes())
def test_each_recipe_reward_set_grades_a_formatted_wrong_answer_wrong(recipe):
    cfg = load_config(recipe)
    assert correctness_index(cfg.reward.functions) is not None, f"{recipe} has no correctness reward"
    instruction = cfg.data.instruction or ""
    template = (XML if "\\boxed" in instruction else XML_BARE) if "<reasoning>" in instruction else PLAIN
    wrong, right = template.format(x=5), template.format(x=7)
    with RewardScorer.from_config(cfg.reward.model_copy(update={"workers": 0}), max_tokens=cfg.rollout.max_tokens) as scorer:
        scored = scorer.score([wrong, right], [{"answer": "7"}] * 2, [{"completion_tokens": 20, "truncated": False}] * 2)
    assert scored.correct == [False, True]
    if template is not PLAIN:  # the releases' xmlcount bonus: the wrong answer still has a positive total
        assert scored.totals[0] > 0


def test_the_llada_recipes_grade_with_first_boxed_at_full_marks():
    cfg = load_config("igpo_llada")
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("first_boxed_correct", 3.0), ("xmlcount", 1.0)]
    assert cfg.reward.functions[correctness_index(cfg.reward.functions)].name == "first_boxed_correct"


@register_reward("test_correctness_half_credit")
def half_credit(completion, answer, **row):
    return 1.0 if answer in completion else 0.5


def test_a_user_reward_marked_correctness_decides_at_full_marks():
    with RewardScorer([("test_correctness_half_credit", 2.0), ("xmlcount", 1.0)], correctness=0) as scorer:
        scored = scorer.score(["it is 7", "it is 5"], [{"answer": "7"}] * 2)
    assert scored.correct == [True, False]  # 0.5 of 1 is partial credit, not a right answer
    assert scored.totals == [2.0, 1.0]


def test_without_a_correctness_reward_nothing_is_guessed():
    with RewardScorer([("xmlcount", 1.0)]) as scorer:
        scored = scorer.score([XML.format(x=5)], [{"answer": "7"}])
    assert scored.totals[0] > 0 and scored.correct is None


def test_two_correctness_rewards_are_refused():
    cfg = load_config(None, ["reward.functions=[{name: math_verify}, {name: first_boxed_correct}]"])
    with pytest.raises(RewardError, match="correctness: false"):
        correctness_index(cfg.reward.functions)
    cfg = load_config(None, ["reward.functions=[{name: math_verify}, {name: first_boxed_correct, correctness: false}]"])
    assert correctness_index(cfg.reward.functions) == 0


IGPO_BASE = ["model.kind=masked_diffusion", "rollout.engine=diffusion"]


@pytest.mark.parametrize("overrides, needs", [
    (["algorithm=igpo", *IGPO_BASE], "IGPO's all-wrong trigger"),
    (["algorithm=diffu_grpo", *IGPO_BASE], "all-wrong group counts"),
    (["algorithm=grpo", "grpo.dynamic_sampling=true"], "dynamic_sampling"),
])
def test_algorithms_that_read_correctness_refuse_a_reward_set_without_it(overrides, needs):
    cfg = load_config(None, [*overrides, "reward.functions=[{name: first_boxed_correct, correctness: false}, {name: xmlcount}]"])
    with pytest.raises(RewardError) as e:
        build_algorithm(cfg)
    message = str(e.value)
    assert needs in message and "correctness: true" in message and "math_verify" in message
    # The same reward marked as the signal is accepted.
    build_algorithm(load_config(None, [*overrides, "reward.functions=[{name: first_boxed_correct}, {name: xmlcount}]"]))


def test_plain_grpo_runs_without_a_correctness_reward():
    build_algorithm(load_config(None, ["reward.functions=[{name: boxed_format}]"]))


def test_dynamic_sampling_keeps_groups_by_correctness_not_reward():
    algorithm = build_algorithm(load_config(None, ["grpo.dynamic_sampling=true", "grpo.group_size=2"]))
    assert algorithm.keep_group([0.75, 0.5], [False, False]) is False  # different formats, both wrong
    assert algorithm.keep_group([3.0, 3.0], [True, False]) is True  # equal totals, one right
    assert algorithm.keep_group([3.75, 3.0], [True, True]) is False


class FormatOnlyLoop(FakeLoop):
    """Every inpainted sample is well formatted (reward 0.75); only hint-led ones are right."""

    def score(self, completions, rows):
        correct = [self.right(c) for c in completions]
        return [3.75 if ok else 0.75 for ok in correct], correct


def test_igpo_triggers_on_all_wrong_answers_whatever_the_format_reward():
    algorithm = igpo()
    sampled = sampled_round([[False] * G])
    # The release's xmlcount gives every sample a positive total: all wrong all the same.
    sampled = type(sampled)(sampled.rows, sampled.prompt_ids, sampled.completions, [[0.75] * G], sampled.correct)
    loop = FormatOnlyLoop()
    repair = algorithm.repair_groups(sampled, loop.generate, loop.score)
    assert len(loop.calls) == 1 and repair.counts["inpainted"] == G
    swapped = [k for k in range(G) if repair.sampled.completions[0][k] is not sampled.completions[0][k]]
    # Only samples the correctness reward passed replace; a merely well-formatted one never does.
    assert swapped and all(loop.right(repair.sampled.completions[0][k]) for k in swapped)
    assert all(repair.sampled.rewards[0][k] == 3.75 for k in swapped)
    assert repair.counts["replaced"] == len(swapped) <= G // 2
