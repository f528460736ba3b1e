"""Masked-diffusion SFT (rl.demo.diffusion_sft) and the tiny diffusion model and task (rl.demo.tiny).

The loss is checked against a per-row, per-position loop that writes LLaDA's formula out; the
masking against its definition; the tiny model against what a masked diffusion LM must be
(bidirectional, per-position logits); and a short warm-up must actually lower the loss.
"""
import math
import re

import pytest
import torch

from rewards.math import math_verify_reward
from rl.data import normalize_row
from rl.demo.diffusion_sft import eos_padded_answer, mask_answers, masked_diffusion_sft_loss, sft_batch
from rl.demo.tiny import build_diffusion_model, chain_addition_rows, reasoning_completion, warm_up_diffusion

MASK_ID = 99


def _reference_loss(logits, target_ids, masked, t, answer_lens):
    """LLaDA's SFT loss written out: (1/B) sum_b (1/L_b) sum_{i masked in b} -log p_b,i(x_i) / t_b."""
    batch, width, _ = logits.shape
    total = 0.0
    for b in range(batch):
        row = 0.0
        for i in range(width):
            if masked[b, i]:
                log_z = math.log(sum(math.exp(v) for v in logits[b, i].tolist()))
                row += (log_z - logits[b, i, target_ids[b, i]].item()) / t[b].item()
        total += row / answer_lens[b].item()
    return total / batch


def _varied_batch(seed=0):
    """Three rows with different prompt and answer lengths and right padding after the answer."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.tensor([2, 4, 1])
    answer_lens = torch.tensor([5, 3, 7])
    width = 9
    input_ids = torch.randint(0, 20, (3, width), generator=g)
    logits = torch.randn(3, width, 20, generator=g)
    return input_ids, prompt_lens, answer_lens, logits, g


def test_loss_matches_the_written_out_formula():
    input_ids, prompt_lens, answer_lens, logits, g = _varied_batch()
    _, masked, t = mask_answers(input_ids, prompt_lens, answer_lens, MASK_ID, g)
    assert masked.any()
    loss = masked_diffusion_sft_loss(logits, input_ids, masked, t, answer_lens)
    assert loss.item() == pytest.approx(_reference_loss(logits, input_ids, masked, t, answer_lens), rel=1e-5)


def test_only_answer_positions_are_masked_and_replaced_by_the_mask_token():
    input_ids, prompt_lens, answer_lens, _, g = _varied_batch(seed=1)
    for _ in range(20):
        noisy, masked, t = mask_answers(input_ids, prompt_lens, answer_lens, MASK_ID, g)
        for b in range(3):
            start, end = prompt_lens[b].item(), (prompt_lens[b] + answer_lens[b]).item()
            assert not masked[b, :start].any(), "a prompt position was masked"
            assert not masked[b, end:].any(), "a padding position after the answer was masked"
        assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK_ID))
        assert torch.equal(noisy[~masked], input_ids[~masked])
        assert ((t >= 1e-3) & (t <= 1)).all()


def test_gradient_flows_only_from_masked_answer_positions():
    input_ids, prompt_lens, answer_lens, logits, g = _varied_batch(seed=2)
    _, masked, t = mask_answers(input_ids, prompt_lens, answer_lens, MASK_ID, g)
    logits.requires_grad_(True)
    masked_diffusion_sft_loss(logits, input_ids, masked, t, answer_lens).backward()
    has_gradient = logits.grad.abs().sum(-1) > 0
    assert torch.equal(has_gradient, masked)


def test_masked_fraction_follows_t_on_long_answers():
    prompt_lens = torch.full((16,), 3)
    answer_lens = torch.full((16,), 4000)
    input_ids = torch.zeros(16, 4003, dtype=torch.long)
    _, masked, t = mask_answers(input_ids, prompt_lens, answer_lens, MASK_ID, torch.Generator().manual_seed(0))
    fraction = masked[:, 3:].float().mean(1)
    # Binomial std at most sqrt(0.25 / 4000) = 0.008: 0.03 is almost 4 standard deviations.
    assert (fraction - t).abs().max().item() < 0.03
    assert t.min().item() < 0.4 and t.max().item() > 0.6  # one t per row, spread over (0, 1]


def test_one_over_t_weighting_makes_the_loss_unbiased():
    """With predictions fixed, E[loss] over t and the masking is the mean answer cross-entropy:
    each position is masked with probability t and weighed 1/t. Dividing by the masked count
    instead would not have this property."""
    g = torch.Generator().manual_seed(3)
    answer_len, rows = 6, 40000
    logits = torch.randn(1, answer_len + 2, 5, generator=g).expand(rows, -1, -1)
    input_ids = torch.randint(0, 5, (1, answer_len + 2), generator=g).expand(rows, -1)
    prompt_lens, answer_lens = torch.full((rows,), 2), torch.full((rows,), answer_len)
    # eps 0.1 bounds 1/t by 10, so the Monte-Carlo mean settles within the tolerance.
    _, masked, t = mask_answers(input_ids, prompt_lens, answer_lens, MASK_ID, g, eps=0.1)
    estimate = masked_diffusion_sft_loss(logits, input_ids, masked, t, answer_lens).item()
    exact = torch.nn.functional.cross_entropy(logits[0, 2:], input_ids[0, 2:]).item()
    assert estimate == pytest.approx(exact, rel=0.03)


def test_sft_batch_pads_answers_with_eos_then_the_row_with_pad():
    batch = sft_batch([[5, 6], [7]], [[1, 2, 3], [4]], answer_length=5, eos_id=0, pad_id=9)
    assert batch.input_ids.tolist() == [[5, 6, 1, 2, 3, 0, 0], [7, 4, 0, 0, 0, 0, 9]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 6 + [0]]
    assert batch.prompt_lens.tolist() == [2, 1] and batch.answer_lens.tolist() == [5, 5]
    with pytest.raises(ValueError, match="answer_length"):
        eos_padded_answer([1, 2, 3], eos_id=0, answer_length=3)  # no room for an EOS


def _value(expression):
    """Value of a chain of single digits joined by + and -, e.g. "7-3+5" -> 9."""
    return sum(int(term) for term in re.findall(r"[+-]?\d", expression))


def test_chain_rows_are_consistent_and_scored_by_the_default_reward():
    rows = chain_addition_rows(200, seed=0)
    for index, row in enumerate(rows):
        row = normalize_row(row, index)
        assert row["problem"].endswith("=") and "solution" in row
        assert _value(row["problem"][:-1]) == int(row["answer"])
        for step in row["solution"].split():
            left, result = step.split("=")
            assert _value(left) == int(result) and 0 <= int(result) <= 9
        completion = reasoning_completion(row)
        assert math_verify_reward(completion, row["answer"]) == 1.0
        wrong = str((int(row["answer"]) + 1) % 10)
        assert math_verify_reward(completion[: -len(row["answer"])] + wrong, row["answer"]) == 0.0


@pytest.fixture(scope="module")
def diffusion_model(tmp_path_factory):
    return build_diffusion_model(tmp_path_factory.mktemp("diffusion") / "model", hidden=64, layers=2)


def test_tiny_model_is_bidirectional_and_the_trace_tokenizes_as_a_prefix(diffusion_model):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(diffusion_model)
    model = AutoModelForMaskedLM.from_pretrained(diffusion_model).eval()
    row = chain_addition_rows(1, seed=4)[0]
    trace = tok(row["solution"], add_special_tokens=False)["input_ids"]
    completion = tok(reasoning_completion(row), add_special_tokens=False)["input_ids"]
    # IGPO's hint token j goes to answer position j: the trace must tokenize as the completion's prefix.
    assert completion[: len(trace)] == trace
    assert "####" in tok.convert_ids_to_tokens(completion)[len(trace)]
    ids = torch.tensor([tok(row["question"], add_special_tokens=False)["input_ids"] + completion])
    changed = ids.clone()
    changed[0, -1] = tok.mask_token_id
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert before.shape == (1, ids.shape[1], len(tok))
    assert not torch.allclose(before[0, 0], after[0, 0]), "the first position must see the last token"


def _held_out_loss(model_dir, rows):
    """The SFT loss on a fixed batch and a fixed masking draw, so two models are compared exactly."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    batch = sft_batch(
        [tok(r["question"], add_special_tokens=False)["input_ids"] for r in rows],
        [tok(reasoning_completion(r), add_special_tokens=False)["input_ids"] for r in rows],
        answer_length=24, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
    )
    noisy, masked, t = mask_answers(batch.input_ids, batch.prompt_lens, batch.answer_lens, tok.mask_token_id,
                                    torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=noisy, attention_mask=batch.attention_mask).logits
    return masked_diffusion_sft_loss(logits, batch.input_ids, masked, t, batch.answer_lens).item()


def test_warm_up_lowers_the_sft_loss(tmp_path):
    model_dir = build_diffusion_model(tmp_path / "model", hidden=64, layers=2)
    held_out = chain_addition_rows(64, seed=99)
    before = _held_out_loss(model_dir, held_out)
    warm_up_diffusion(model_dir, chain_addition_rows(32 * 150, seed=1), steps=150)
    after = _held_out_loss(model_dir, held_out)
    # Measured: 6.7 (the random model) -> 1.3 after 150 steps (3 s).
    assert after < 0.5 * before, f"SFT loss {before:.3f} -> {after:.3f}"
