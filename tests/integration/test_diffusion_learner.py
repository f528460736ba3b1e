"""Masked-diffusion models in the learner and the engine, against plain PyTorch written here.

The reference scores each sequence alone: one forward of the HF model on [prompt ; ANSWER_LEN mask
tokens], log_softmax at answer position t for completion token t (d1's one-step estimator). The
learner (in process and as a 2-rank ZeRO-3 Ray group) and the diffusion engine must give the same
numbers, and the learner's optimizer step must land on the parameters of a plain AdamW step.
"""
import sys

import pytest
import ray
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from rl.core.batch import SequenceBatch
from rl.config import LearnerConfig
from rl.learner.group import DiffusionForward, LearnerGroup, LearnerWorker, free_port
from rl.demo.tiny import build_diffusion_model
from rollouts.diffusion_engine import MaskedDiffusionEngine
from rl.core.types import SamplingSpec, ScoringRequest
from tests.batches import varied_batch

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ANSWER_LEN = 8
# As in test_learner.py (which says why), with ATOL 5e-6: a bidirectional model mixes every
# position into every gradient, and a few elements land at 1e-6. Parameters move ~1e-3.
LR, GRAD_SCALE, MAX_GRAD_NORM, ATOL = 1e-3, 1e4, 1e3, 5e-6
BATCHES = [varied_batch(1, GRAD_SCALE), varied_batch(2, GRAD_SCALE)]


def pg_loss(out, mb):
    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    loss = -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer
    return loss, {"tokens": mb.completion_mask.sum().item()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_diffusion_model(tmp_path_factory.mktemp("dllm") / "model")


@pytest.fixture(scope="module")
def mask_id(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir)).mask_token_id


def reference_logprobs(model, mask: int, prompt: list[int], tokens: list[int], prompt_override=None) -> torch.Tensor:
    seq = list(prompt_override or prompt) + [mask] * ANSWER_LEN
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) : len(prompt) + len(tokens)], -1)
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.fixture(scope="module")
def reference(model_dir, mask_id):
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        initial = [reference_logprobs(model, mask_id, ids[:p], ids[p:]) for ids, p in zip(BATCHES[0].input_ids, BATCHES[0].prompt_lens)]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)  # the learner's default
    for batch in BATCHES:
        total = torch.zeros(())
        for ids, p, adv in zip(batch.input_ids, batch.prompt_lens, batch.token_fields["advantages"]):
            total = total - (torch.tensor(adv) * reference_logprobs(model, mask_id, ids[:p], ids[p:])).sum()
        opt.zero_grad()
        (total / batch.loss_normalizer).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
    return initial, model.state_dict()


def config(**kw) -> LearnerConfig:
    return LearnerConfig(**{"lr": LR, "max_grad_norm": MAX_GRAD_NORM, **kw})


def assert_rows_close(actual, expected, atol=1e-5):
    assert [len(r) for r in actual] == [len(r) for r in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.tensor(a), e, atol=atol, rtol=0)


# A key bias adds the same q.b to every score of a query, which softmax ignores: its gradient is 0
# in exact arithmetic, float noise in practice, and Adam's normalisation turns noise into full
# steps of random sign. No implementation can match another there.
NOISE_ONLY = "attention.self.key.bias"


def assert_state_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(NOISE_ONLY):
            continue
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_in_process_learner_scores_and_steps_like_plain_pytorch(model_dir, mask_id, reference):
    initial, final = reference
    worker = LearnerWorker(str(model_dir), config(micro_batch_size=2), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           diffusion=DiffusionForward(ANSWER_LEN, mask_id))
    assert_rows_close(worker.compute_logprobs(BATCHES[0])[0], initial)
    for batch in BATCHES:
        worker.train_step(batch, pg_loss)
    state = worker.full_state_dict()
    assert_state_close(state, final)
    start = AutoModelForMaskedLM.from_pretrained(str(model_dir)).state_dict()
    assert max((state[k] - start[k]).abs().max().item() for k in state) > 100 * ATOL


def test_zero3_group_with_reference_matches(ray_session, model_dir, mask_id, reference):
    initial, final = reference
    group = LearnerGroup(str(model_dir), config(num_learners=2, zero_stage=3, micro_batch_size=1), "float32", seed=0,
                         total_steps=2, with_reference=True, diffusion=DiffusionForward(ANSWER_LEN, mask_id))
    try:
        for batch in BATCHES:
            group.train_step(batch, pg_loss)
        assert_state_close(group.full_state_dict(), final)
        # The frozen reference still scores as the initial model.
        assert_rows_close(group.compute_logprobs(BATCHES[0], reference=True)[0], initial)
    finally:
        group.close()


def test_prompt_masking_is_the_same_for_every_forward_of_a_sequence(model_dir, mask_id):
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32)
    worker = LearnerWorker(str(model_dir), config(micro_batch_size=2), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           diffusion=DiffusionForward(ANSWER_LEN, mask_id, prompt_mask_prob=0.5))
    batch = SequenceBatch([[7, 8, 9, 10, 11, 12, 20, 21], [30, 31, 32, 40]], [6, 3])
    first, second = worker.compute_logprobs(batch)[0], worker.compute_logprobs(batch.select([1, 0]))[0]
    assert first == [second[1], second[0]]  # same masks whatever the batch composition
    with torch.no_grad():
        unmasked = [reference_logprobs(model, mask_id, ids[:p], ids[p:]) for ids, p in zip(batch.input_ids, batch.prompt_lens)]
        everything_masked = reference_logprobs(model, mask_id, [7] * 6, [20, 21], prompt_override=[mask_id] * 6)
    differs = [not torch.allclose(torch.tensor(a), e, atol=1e-5) for a, e in zip(first, unmasked)]
    assert any(differs)  # some prompt tokens were masked
    assert not torch.allclose(torch.tensor(first[0]), everything_masked, atol=1e-5)  # but not all of them


def test_with_prompt_masking_engine_and_learner_estimates_agree(model_dir, mask_id):
    """d1's prompt masking on: the engine's estimates at generation and in `score` (the weight-sync
    check) mask each prompt as the learner does, and all three equal a plain forward on the prompt
    with exactly those tokens masked."""
    from rl.sync.check import check_weight_sync
    from rollouts.diffusion import prompt_mask

    prob = 0.5
    engine = MaskedDiffusionEngine(str(model_dir), seed=0, answer_length=ANSWER_LEN, block_length=4, steps=4,
                                   prompt_mask_prob=prob)
    worker = LearnerWorker(str(model_dir), config(micro_batch_size=2), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           diffusion=DiffusionForward(ANSWER_LEN, mask_id, prompt_mask_prob=prob))
    prompts = [[7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20]]
    completions = [c for g in engine.generate(prompts, SamplingSpec(n=2, temperature=1.0, max_tokens=ANSWER_LEN)) for c in g]
    batch = SequenceBatch([c.prompt_ids + c.token_ids for c in completions], [len(c.prompt_ids) for c in completions])
    learner_lp = worker.compute_logprobs(batch)[0]
    scored = engine.score([ScoringRequest(c.prompt_ids, c.token_ids) for c in completions])
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32)
    masked_somewhere = False
    for c, lp, sc in zip(completions, learner_lp, scored):
        masked = prompt_mask(c.prompt_ids, c.token_ids, 0, prob)
        masked_somewhere |= bool(masked.any())
        override = [mask_id if m else t for t, m in zip(c.prompt_ids, masked.tolist())]
        with torch.no_grad():
            expected = reference_logprobs(model, mask_id, c.prompt_ids, c.token_ids, prompt_override=override)
        for estimate in (c.logprobs, lp, sc):
            torch.testing.assert_close(torch.tensor(estimate), expected, atol=1e-5, rtol=0)
    assert masked_somewhere

    class OneEnginePool:
        def score_each_engine(self, requests):
            return [engine.score(requests)]

    gaps = check_weight_sync(OneEnginePool(), worker, batch, len(batch), threshold=1e-4)
    assert gaps["logprob_gap_max"] < 1e-5


def test_two_inner_updates_use_different_prompt_masks(model_dir, mask_id):
    """diffu-GRPO's update (d1): a fresh prompt mask per inner update, its old-policy log-probs
    scored under that mask before any update; update 0 keeps the batch's own."""
    from rl.algorithms.diffu_grpo import DiffuGRPO
    from rl.config import RunConfig
    from rollouts.diffusion import MASK_SEED_FIELD, prompt_mask

    prompt, completion = list(range(7, 27)), [30, 31, 32]
    assert not torch.equal(prompt_mask(prompt, completion, 0, 0.5), prompt_mask(prompt, completion, 1, 0.5))
    settings = DiffusionForward(ANSWER_LEN, mask_id, prompt_mask_prob=0.5)
    worker = LearnerWorker(str(model_dir), config(micro_batch_size=2), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           diffusion=settings)

    class RecordingLearner:
        """Scores with the real rank; records what each update would train on."""

        def __init__(self):
            self.trained = []

        def score(self, batch, *, reference=False, entropy=False):
            return worker.compute_logprobs(batch, 1.0, entropy, reference)

        def train(self, batch, loss, *, return_logprobs=False):
            self.trained.append(batch)
            return {"loss": 0.0}

    batch = SequenceBatch([prompt + completion, prompt[:12] + completion], [20, 12])
    old = worker.compute_logprobs(batch)[0]
    batch.token_fields["old_logprobs"] = old
    algorithm = DiffuGRPO(RunConfig(algorithm="diffu_grpo", model={"kind": "masked_diffusion"},
                                    rollout={"engine": "diffusion"},
                                    diffu_grpo={"prompt_mask_prob": 0.5, "updates_per_batch": 2}))
    learner = RecordingLearner()
    update = algorithm.update(batch, learner)
    first, second = learner.trained
    assert first.seq_fields[MASK_SEED_FIELD] == [0.0, 0.0] and first.token_fields["old_logprobs"] == old
    assert second.seq_fields[MASK_SEED_FIELD] == [1.0, 1.0] and second.token_fields["old_logprobs"] != old
    assert worker.compute_logprobs(second)[0] == second.token_fields["old_logprobs"]  # the update's forward sees that mask
    assert worker.compute_logprobs(first)[0] == old
    assert update.checked is first and MASK_SEED_FIELD not in batch.seq_fields  # the given batch is left as it was
    one = DiffuGRPO(RunConfig(algorithm="diffu_grpo", model={"kind": "masked_diffusion"}, rollout={"engine": "diffusion"},
                              diffu_grpo={"prompt_mask_prob": 0.5, "updates_per_batch": 1, "track_mismatch": False}))
    learner = RecordingLearner()
    one.update(batch, learner)
    assert learner.trained == [batch]  # one update: no mask schedule


def test_engine_estimates_match_and_follow_weight_pushes(model_dir, mask_id, reference):
    initial, final = reference
    engine = MaskedDiffusionEngine(str(model_dir), seed=0, answer_length=ANSWER_LEN, block_length=4, steps=4)
    requests = [ScoringRequest(ids[:p], ids[p:]) for ids, p in zip(BATCHES[0].input_ids, BATCHES[0].prompt_lens)]
    assert_rows_close(engine.score(requests), initial)
    groups = engine.generate([[7, 8, 9], [10, 11]], SamplingSpec(n=3, temperature=1.0, max_tokens=ANSWER_LEN))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32)
    eos = engine.tokenizer.eos_token_id
    for group in groups:
        assert len(group) == 3
        for c in group:
            # Cut after the first end token; the estimate is of the kept tokens in an 8-position answer.
            assert eos not in c.token_ids[:-1] and (c.finish_reason == "stop") == (c.token_ids[-1] == eos)
            with torch.no_grad():
                expected = reference_logprobs(model, mask_id, c.prompt_ids, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
    engine.load_weights(final)
    model.load_state_dict(final)
    with torch.no_grad():
        moved = [reference_logprobs(model, mask_id, r.prompt_ids, r.token_ids) for r in requests]
    assert_rows_close(engine.score(requests), moved)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(moved, initial))


def test_engine_inpaints_and_other_engines_refuse_hints(model_dir):
    engine = MaskedDiffusionEngine(str(model_dir), seed=0, answer_length=ANSWER_LEN, block_length=4, steps=8)
    hint = {0: 40, 1: 41, 5: 42}
    # A random model emits end tokens anywhere; at greedy with hints the kept prefix shows them.
    (group,) = engine.generate([[7, 8, 9]], SamplingSpec(n=4, temperature=1.0, max_tokens=ANSWER_LEN), hints=[hint])
    for c in group:
        for pos, token in hint.items():
            if pos < len(c.token_ids):
                assert c.token_ids[pos] == token and c.hint_mask[pos]
        assert sum(c.hint_mask) == sum(1 for pos in hint if pos < len(c.token_ids))
    from rollouts.hf_engine import HFEngine

    with pytest.raises(ValueError, match="masked-diffusion engine"):
        HFEngine.generate(None, [[1]], SamplingSpec(), hints=[{0: 1}])


def test_lora_on_a_masked_diffusion_model(model_dir, mask_id, reference):
    from rl.config import LoraConfig

    initial, _ = reference
    lora = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["query", "value"])
    worker = LearnerWorker(str(model_dir), config(micro_batch_size=2, lr=1e-2), "float32", 0, 1, "127.0.0.1", free_port(),
                           0, 10, with_reference=True, lora=lora, diffusion=DiffusionForward(ANSWER_LEN, mask_id))
    for _ in range(2):  # B starts at zero: the first step moves B, the second moves the merged weights
        worker.train_step(BATCHES[0], pg_loss)
    merged = worker.full_state_dict()
    start = AutoModelForMaskedLM.from_pretrained(str(model_dir)).state_dict()
    assert merged.keys() == start.keys()  # the engines' names, no adapter tensors
    changed = {k for k in start if not torch.equal(merged[k], start[k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed)
    # Adapters disabled is the frozen reference: still the initial model's estimates.
    assert_rows_close(worker.compute_logprobs(BATCHES[0], reference=True)[0], initial)
