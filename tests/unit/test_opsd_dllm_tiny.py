"""recipe opsd_tiny_dllm's teacher (built model tiny-dllm-chain-addition-reader) reads the reference
trace it is shown, which the student cannot: what makes it a teacher shown the answer (issue 27 §3)."""
from __future__ import annotations

import torch

import rl.demo.tiny as tiny
from rl.config import load_config
from rl.data import build_teacher_prompt, normalize_row


def _greedy_accuracy(model_dir, prompts: list[list[int]], rows) -> float:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from rewards.math import final_answer
    from rollouts.diffusion import diffusion_sample

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sample = diffusion_sample(lambda ids, att: model(input_ids=ids, attention_mask=att).logits, prompts,
                              mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, gen_length=24, block_length=8, steps=12,
                              temperature=0.0)
    texts = tok.batch_decode(sample.tokens, skip_special_tokens=True)
    return sum(final_answer(t) == r["answer"] for t, r in zip(texts, rows)) / len(rows)


def test_the_reader_teacher_reads_the_reference_the_student_cannot():
    from transformers import AutoTokenizer

    from rl.models import resolve_model_path

    cfg = load_config("opsd_tiny_dllm")
    student, teacher = resolve_model_path(cfg.model.path), resolve_model_path(cfg.opsd.teacher.path)
    tok = AutoTokenizer.from_pretrained(str(student))
    rows = tiny.synthetic_rows("chain_addition", "test")[:64]
    # The recipe's teacher view, built as OPSD builds it: the text the reader was trained on.
    views = [build_teacher_prompt(normalize_row(r, i), cfg.data, tok, cfg.opsd.teacher_template, cfg.opsd.teacher_instruction,
                                  cfg.opsd.teacher_enable_thinking) for i, r in enumerate(rows)]
    assert views[0] == tok(tiny.teacher_view(rows[0]), add_special_tokens=False)["input_ids"]
    reader = _greedy_accuracy(teacher, views, rows)
    assert reader >= 0.9
    assert _greedy_accuracy(student, views, rows) < reader - 0.3
