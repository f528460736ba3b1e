"""The OPD comparison's task and models (recipe opd_tiny, scripts/experiment_opd.py): the held-out
addition pairs never reach RL training or the teacher's SFT, and the SFT teacher (built with
`python -m rl.sft`) is better than the student on the pairs it was trained on."""
from __future__ import annotations

import torch

import rl.demo.tiny as tiny
from rl.config import load_config
from rl.data import load_rows


def pairs_of(rows):
    return {tuple(int(x) for x in r["question"].rstrip("=").split("+")) for r in rows}


def test_the_held_out_pairs_are_never_trained_on():
    train = tiny.synthetic_rows("addition_pairs", "train")
    heldout = tiny.synthetic_rows("addition_pairs", "test")
    in_distribution = tiny.synthetic_rows("addition_train_pairs", "test")
    assert len(train) == 2000 and len(heldout) == len(in_distribution) == 50
    assert len(pairs_of(heldout)) == len(pairs_of(in_distribution)) == 50
    assert pairs_of(train) == pairs_of(in_distribution)  # all 50 training pairs are drawn
    assert not pairs_of(train) & pairs_of(heldout)
    assert pairs_of(train) | pairs_of(heldout) == {(a, b) for a in range(10) for b in range(10)}
    assert all(r["answer"] == str(sum(pairs_of([r]).pop())) for r in train + heldout)
    # The recipe reads the same rows.
    cfg = load_config("opd_tiny")
    assert pairs_of(load_rows(cfg.data, seed=0)) == pairs_of(train)


def _mean_gold_logprob(model_dir: str, rows) -> float:
    """Mean log p(answer + EOS | `a+b=`) under the model, written out plainly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for r in rows:
            prompt = tok(r["question"], add_special_tokens=False)["input_ids"]
            gold = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([prompt + gold])).logits[0, len(prompt) - 1 : -1], -1)
            total += logp[torch.arange(len(gold)), torch.tensor(gold)].sum().item()
    return total / len(rows)


def test_the_sft_teacher_learned_the_training_pairs():
    from rl.models import resolve_model_path

    student, teacher = resolve_model_path("tiny-qwen3-addition"), resolve_model_path("tiny-qwen3-addition-sft")
    train = tiny.synthetic_rows("addition_train_pairs", "test")
    assert _mean_gold_logprob(teacher, train) > _mean_gold_logprob(student, train) + 0.3
