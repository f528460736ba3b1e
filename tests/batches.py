"""Step batches shared by the learner tests."""
import random

from rl.core.batch import SequenceBatch

# Prompt and completion lengths all differ, so a per-micro-batch mean would weight tokens
# differently from the global token mean.
SHAPES = [(3, 5), (1, 2), (4, 6), (2, 1), (2, 4)]


def varied_batch(seed: int, grad_scale: float, teacher_is_student: bool = False) -> SequenceBatch:
    """Random token ids and advantages; the token-mean normaliser divided by `grad_scale`.

    teacher_is_student: the teacher view is the student's own sequences (a frozen teacher must
    then score exactly like the base model)."""
    rng = random.Random(seed)
    ids, prompt_lens, adv = [], [], []
    for p, c in SHAPES:
        ids.append([rng.randrange(5, 300) for _ in range(p + c)])
        prompt_lens.append(p)
        adv.append([rng.uniform(-1, 1) for _ in range(c)])
    n_tokens = sum(c for _, c in SHAPES)
    teacher = dict(teacher_input_ids=ids, teacher_prompt_lens=prompt_lens) if teacher_is_student else {}
    return SequenceBatch(ids, prompt_lens, token_fields={"advantages": adv}, loss_normalizer=n_tokens / grad_scale,
                         **teacher)
