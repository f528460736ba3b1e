"""opsd_qwen's and grpo_qwen's prompts are the release's, word for word (siyan-zhao/OPSD at 85d6bf9).

The strings below are copied by hand from the release's data collator and grpo_train.py; a chat
template stand-in records the messages and the thinking switch each prompt is rendered with."""
from rl.algorithms import build_algorithm
from rl.algorithms.base import Rollouts
from rl.config import load_config
from rl.data import build_prompt, normalize_row
from rl.core.types import Completion

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
# data_collator.py:58 at 85d6bf9
STUDENT = "Problem: {problem}\n\n" + BOXED
# data_collator.py:28-34 (transition prompt) and 88-94 at 85d6bf9
TEACHER = (
    "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n{solution}\n"
    "=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure you truly understand the "
    "reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, "
    "derive the same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n\n" + BOXED
)
# grpo_train.py:117-132 at 85d6bf9
GRPO_USER = "Problem: {problem}\n" + BOXED


class RecordingTokenizer:
    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **extra):
        self.calls.append((messages, extra.get("enable_thinking")))
        return [len(self.calls)]

    def decode(self, ids, skip_special_tokens=False):  # OPSD's leak metric reads the completion's text
        return " ".join(map(str, ids))


ROW = {"problem": "What is {solution} in 1+1?", "solution": "1+1=2, so \\boxed{2}.", "answer": "2"}


def test_opsd_student_and_teacher_prompts_are_the_releases():
    cfg = load_config("opsd_qwen")
    tok = RecordingTokenizer()
    build_prompt(ROW, cfg.data, tok)
    algorithm = build_algorithm(cfg)
    algorithm.attach_tokenizer(tok)
    completion = Completion([1], [5, 6], "", [-1.0, -1.0], "stop")
    algorithm.build_batch(Rollouts(rows=[ROW], prompt_ids=[[1]], completions=[[completion]], rewards=[[1.0]]))
    (student, student_thinking), (teacher, teacher_thinking) = tok.calls
    assert student == [{"role": "user", "content": STUDENT.replace("{problem}", ROW["problem"])}]
    # The problem's own "{solution}" text stays as it is: the template is filled in one pass.
    assert teacher == [{"role": "user", "content": TEACHER.replace("{problem}", ROW["problem"], 1).replace(
        "{solution}\n=== Reference", ROW["solution"] + "\n=== Reference")}]
    assert (student_thinking, teacher_thinking) == (False, True)


def test_grpo_prompt_columns_and_gold_are_the_releases():
    cfg = load_config("grpo_qwen")
    row = normalize_row({"Question": "2+2?", "Answer": " 4 ", "problem": "other", "solution": "x \\boxed{5}"}, 0,
                        cfg.data.question_key, cfg.data.solution_key, answer_key=cfg.data.answer_key)
    assert (row["problem"], row["answer"]) == ("2+2?", "4")
    tok = RecordingTokenizer()
    build_prompt(row, cfg.data, tok)
    assert tok.calls == [([{"role": "user", "content": GRPO_USER.replace("{problem}", "2+2?")}], True)]
