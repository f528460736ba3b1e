"""d1's GSM8K rewards and evaluation grading (rewards/d1.py) against values worked out by hand
from d1@837888f diffu-grpo/reward_func.py and eval/parse_and_get_acc.py."""
import pytest

from rewards.registry import get_reward, is_correctness_reward

GOOD = "<reasoning>\nHalf of 48 is 24, and 48 + 24 = 72.\n</reasoning>\n<answer>\n72\n</answer>\n"


def score(name, text, answer="72"):
    return get_reward(name)(text, answer=answer)


def test_a_perfect_completion_gets_every_reward():
    assert score("d1_correctness", GOOD) == 2.0
    assert score("d1_int", GOOD) == 0.5
    assert score("d1_strict_format", GOOD) == 0.5
    # d1@837888f's soft pattern has no DOTALL and no explicit newlines, so the prompt's own
    # multi-line format never matches it (a later d1 commit, 4bab4b9, adds re.DOTALL).
    assert score("d1_soft_format", GOOD) == 0.0
    # Four tags once each: 0.5. "\n</answer>\n" is last, so nothing follows it: no penalty; after
    # "\n</answer>" one character ("\n") follows, and the first is free.
    assert score("d1_xmlcount", GOOD) == pytest.approx(0.5)
    assert is_correctness_reward(get_reward("d1_correctness")) and not is_correctness_reward(get_reward("d1_int"))


def test_correctness_is_an_exact_string_match_of_the_last_answer_tag():
    assert score("d1_correctness", "<answer>\n72.0\n</answer>") == 0.0  # no numeric equivalence
    assert score("d1_correctness", "<answer>1</answer> then <answer> 72 </answer>") == 2.0  # the last tag
    assert score("d1_correctness", "the answer is 72") == 0.0
    assert score("d1_correctness", "72") == 2.0  # no tag: the whole text, stripped (d1's split)
    assert score("d1_int", "<answer>\n-3\n</answer>") == 0.0  # "-3".isdigit() is False
    assert score("d1_int", "<answer>\n3.5\n</answer>") == 0.0


def test_format_rewards_do_not_cross_lines():
    multiline = "<reasoning>\nstep 1\nstep 2\n</reasoning>\n<answer>\n72\n</answer>\n"
    assert score("d1_strict_format", multiline) == 0.0  # no DOTALL in d1: one reasoning line only
    assert score("d1_soft_format", multiline) == 0.0
    assert score("d1_soft_format", "<reasoning>x</reasoning> <answer>72</answer> more") == 0.5
    assert score("d1_strict_format", GOOD + "extra") == 0.0


def test_xmlcount_length_penalty_by_hand():
    text = GOOD + "tail!"  # 5 characters after "\n</answer>\n"
    # 0.5 - 5 * 0.001 (after "\n</answer>\n") - (6 - 1) * 0.001 (after "\n</answer>": "\ntail!")
    assert score("d1_xmlcount", text) == pytest.approx(0.5 - 0.005 - 0.005)
    no_close = "<reasoning>\nr\n</reasoning>\n<answer>\n72"
    # three tags; "\n</answer>\n" absent, so the penalty counts the whole text (d1's split quirk)
    assert score("d1_xmlcount", no_close) == pytest.approx(0.375 - len(no_close) * 0.001)
    assert score("d1_xmlcount", "\\boxed{72}") == 0.0  # no box credit, unlike IGPO's xmlcount


@pytest.mark.parametrize("text, correct", [
    ("\\boxed{72} and later \\boxed{5}", True),          # the first box
    ("\\boxed{5} and later \\boxed{72}", False),         # not the last
    ("\\boxed{} \\boxed{...} \\boxed{72}", True),        # empty and dots are skipped
    ("\\boxed{x = 72 dollars}", True),                   # not a float: the first number in it
    ("\\boxed{72.0}", True),                             # float equality
    ("<answer>\nso 3 then 72\n</answer>", True),         # no box: the last number of the first tag
    ("<answer>72</answer> <answer>5</answer>", True),    # the first answer tag
    ("<answer>5</answer> <answer>72</answer>", False),
    ("\\boxed{5} <answer>72</answer>", False),           # a parseable box wins over the tag
    ("72", False),                                       # no box, no tag: no answer, wrong
    ("", False),
])
def test_d1_gsm8k_grading(text, correct):
    assert score("d1_gsm8k", text) == (1.0 if correct else 0.0)
    assert is_correctness_reward(get_reward("d1_gsm8k"))


def test_d1_gsm8k_gold_reads_plain_and_hash_answers():
    assert score("d1_gsm8k", "\\boxed{1000}", answer="1,000") == 1.0
    assert score("d1_gsm8k", "\\boxed{72}", answer="He sold 72.\n#### 72") == 1.0
    assert score("d1_gsm8k", "\\boxed{72}", answer="not a number") == 0.0
