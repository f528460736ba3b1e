"""OPSD that does not leak (issue 27 §2): RLSD's token advantages and loss, the leak measure, the
final-answer span, the reasoning/answer KL split, and the guard's rising-entropy-falling-length
rule, each against a plain reference written here."""
import math

import pytest
import torch

from rl.algorithms import Rollouts
from rl.algorithms.distill_metrics import answer_token_mask, last_boxed_span, leaks, states_answer
from rl.algorithms.divergences import rlsd_token_advantages
from rl.algorithms.opsd import ANSWER_MASK, OPSD, split_kl
from rl.config import RunConfig
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.core.types import Completion
from rl.loop.guards import DivergenceGuard
from rl.loop.stopped import RunStopped

LENS = [4, 1, 6]
HIDDEN, VOCAB = 6, 13
TEMPERATURE = 1.3


def test_rlsd_token_advantages_against_the_rule():
    adv = torch.tensor([1.5, 1.5, -0.7, -0.7, 0.0])
    ratio = torch.tensor([0.5, -3.0, 0.1, 2.0, 1.0])
    got = rlsd_token_advantages(adv, ratio, mix=0.6, clip=0.2)
    for a, d, g in zip(adv.tolist(), ratio.tolist(), got.tolist()):
        sign = (a > 0) - (a < 0)
        w = min(max(math.exp(sign * d), 0.8), 1.2)
        assert g == pytest.approx(a * (0.4 + 0.6 * w))
        assert g == 0 or (g > 0) == (a > 0)  # the reward sets the direction, never the teacher
    # mix 0 is plain GRPO: the sequence's advantage on every token.
    assert torch.equal(rlsd_token_advantages(adv, ratio, mix=0.0), adv)


def test_rlsd_loss_matches_a_plain_policy_gradient():
    cfg = RunConfig(algorithm="opsd", opsd={"mode": "rlsd", "group_size": 2, "rlsd_mix": 0.7, "rlsd_clip": 0.3,
                                            "aggregation": "code", "chunk_size": 4})
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENS]
    seq_adv = [0.9, -1.2, 0.4]
    answer = [[0, 0, 1, 1], [1], [0, 0, 0, 0, 1, 1]]
    batch = SequenceBatch([[1, 2] + t for t in tokens], [2] * 3, loss_normalizer=float(sum(LENS)),
                          token_fields={"advantages": [[a] * n for a, n in zip(seq_adv, LENS)], ANSWER_MASK: answer})
    mb = MicroBatch.from_sequences(batch)
    mb.completion_mask = mb.completion_mask.double()
    mb.token_fields = {k: v.double() for k, v in mb.token_fields.items()}
    hidden = torch.randn(3, max(LENS), HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    t_hidden = hidden + 0.8 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    t_weight = weight + 0.3 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    out = PolicyOutputs(h, weight, TEMPERATURE, t_hidden, t_weight)
    loss, metrics = OPSD(cfg).loss(out, mb)
    loss.backward()

    rh = hidden.clone().requires_grad_(True)
    total, kl = 0.0, {0: [], 1: []}
    for i, n in enumerate(LENS):
        for t in range(n):
            s_lp = torch.log_softmax(weight @ rh[i, t] / TEMPERATURE, -1)[tokens[i][t]]
            t_lp = torch.log_softmax(t_weight @ t_hidden[i, t] / TEMPERATURE, -1)[tokens[i][t]]
            a = seq_adv[i]
            w = min(max(math.exp(math.copysign(1, a) * (t_lp - s_lp).item()), 0.7), 1.3)
            total = total - a * (0.3 + 0.7 * w) * s_lp
            kl[answer[i][t]].append((s_lp - t_lp).item())
    expected = total / sum(LENS)
    expected.backward()
    # The token log-prob kernel computes in float32.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, rh.grad, atol=1e-6, rtol=1e-5)
    split = split_kl(metrics)
    assert split["opsd/kl_reasoning"] == pytest.approx(sum(kl[0]) / len(kl[0]), rel=1e-5)
    assert split["opsd/kl_answer"] == pytest.approx(sum(kl[1]) / len(kl[1]), rel=1e-5)
    assert metrics["entropy_sum"] > 0 and out.kept_logprobs is not None


def test_rlsd_needs_groups():
    with pytest.raises(ValueError, match="group_size to 2 or more"):
        RunConfig(algorithm="opsd", opsd={"mode": "rlsd"})


def test_boxed_span_and_answer_tokens():
    text = r"so 3+4=7 and \boxed{\frac{7}{1}} done"
    start, end = last_boxed_span(text)
    assert text[start:end] == r"\boxed{\frac{7}{1}}"
    assert last_boxed_span(r"\boxed{1} then \boxed{2}") == (15, 24)
    assert last_boxed_span("no box") is None
    pieces = ["so", " 7", " \\box", "ed{", "7", "}", " done"]
    assert answer_token_mask(pieces) == [0, 0, 1, 1, 1, 1, 0]
    assert answer_token_mask(["a", "b"]) == [0, 0]


def test_leak_measure():
    assert states_answer("The answer is 1,234.", "1234")
    assert not states_answer("12345 apples", "1234") and not states_answer("3.14", "3")
    assert leaks("72. Let me check:", "How many? 48 + 24", "72") is True
    assert leaks("First, 48 + 24 is", "How many? 48 + 24", "72") is False
    assert leaks("7 apples", "She has 7 apples", "7") is None  # the problem states it: not measurable


def test_build_batch_reports_leak_advantages_and_answer_mask(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = RunConfig(algorithm="opsd", opsd={"mode": "rlsd", "group_size": 2, "leak_tokens": 3,
                                            "teacher": {"privileged": False, "kind": "frozen"}})
    algo = OPSD(cfg)
    algo.attach_tokenizer(tok)
    rows = [{"problem": "2+3=", "answer": "5", "solution": "5"}, {"problem": "4+4=", "answer": "8", "solution": "8"}]
    prompts = [tok.encode(r["problem"]) for r in rows]
    texts = [["5 is it", "I add 2 and 3 to get 5"], ["so \\boxed{8}", "9"]]
    completions = [[Completion(p, tok.encode(t), t, [], "stop") for t in group] for p, group in zip(prompts, texts)]
    batch, metrics = algo.build_batch(Rollouts(rows, prompts, completions, [[1.0, 0.0], [1.0, 1.0]]))
    assert metrics["opsd/leak"] == pytest.approx(1 / 4)  # only "5 is it" states the answer in its first 3 tokens
    assert batch.teacher_input_ids == batch.input_ids  # privileged false: the teacher sees the student's prompt
    adv = [row[0] for row in batch.token_fields["advantages"]]
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0
    boxed = batch.token_fields[ANSWER_MASK][2]
    assert tok.decode([t for t, m in zip(completions[1][0].token_ids, boxed) if m]).strip() == "\\boxed{8}"
    assert algo.sampling_spec().n == 2 and "advantages" in algo.provides()


def _guard(tmp_path):
    warnings = []
    return DivergenceGuard(1, True, 1000, tmp_path, warn=warnings.append), warnings


def test_guard_stops_when_entropy_rises_while_length_falls(tmp_path):
    guard, _ = _guard(tmp_path)
    guard.check(0, {"entropy": 1.0, "response_length": 200.0}, False)
    assert guard.relative({"entropy": 1.6, "response_length": 90.0}) == {
        "entropy/vs_first": pytest.approx(1.6), "response_length/vs_first": pytest.approx(0.45)}
    guard.check(1, {"entropy": 1.6, "response_length": 90.0}, False)  # one step: not yet a trend
    guard.check(2, {"entropy": 1.2, "response_length": 80.0}, False)  # entropy not up enough: starts over
    guard.check(3, {"entropy": 1.7, "response_length": 90.0}, False)
    with pytest.raises(RunStopped, match=r"entropy per token rose to 1.80x.*shrank to 0.40x.*2 steps in a row"):
        guard.check(4, {"entropy": 1.8, "response_length": 80.0}, False)


def test_guard_leaves_a_healthy_run_alone(tmp_path):
    guard, warnings = _guard(tmp_path)
    guard.check(0, {"entropy": 1.0, "response_length": 200.0}, False)
    for step in range(1, 6):  # entropy falls as RL sharpens; length moves alone
        guard.check(step, {"entropy": 1.0 - 0.1 * step, "response_length": 200.0 / step}, False)
        guard.check(step, {"entropy": 2.0, "response_length": 190.0}, False)
    assert warnings == []
