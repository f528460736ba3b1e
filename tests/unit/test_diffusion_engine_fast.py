"""The diffusion engine's fast path (rollout.diffusion.cache / threshold) and its estimator option:
with neither set it samples exactly as the plain sampler did; parallel decoding on the tiny BERT
model commits at least one token per call (no cache for it); a LLaDA checkpoint gets our cached
model; the estimator option one_step is today's estimate, and a random estimator gives the engine
and the learner the same numbers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from rl.core.batch import MicroBatch, SequenceBatch
from rl.core.types import EngineSettings, SamplingSpec, ScoringRequest
from rl.demo.tiny import build_diffusion_model
from rollouts.diffusion import DiffusionSamplerConfig, diffusion_sample, one_step_logprobs, answer_layout
from rollouts.diffusion_engine import MaskedDiffusionEngine
from rollouts.estimators.rows import estimate_rows
from rollouts.registry import make_engine

ANSWER = 8
PROMPTS = [[7, 8, 9, 10, 11], [15, 16, 17]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_diffusion_model(tmp_path_factory.mktemp("dllm") / "model")


def engine(model_dir, **kw):
    return MaskedDiffusionEngine(str(model_dir), seed=3, answer_length=ANSWER, block_length=4, steps=4, **kw)


def test_config_options_and_their_checks():
    cfg = DiffusionSamplerConfig()
    assert cfg.cache == "none" and cfg.threshold is None
    assert DiffusionSamplerConfig(cache="dual", threshold=0.9).threshold == 0.9
    for bad in (dict(threshold=0.0), dict(threshold=1.5), dict(threshold=0.9, remasking="random"), dict(cache="full")):
        with pytest.raises(ValueError):
            DiffusionSamplerConfig(**bad)


def test_estimator_option_checks():
    from rl.algorithms.diffu_grpo import DiffuGRPOConfig
    from rl.algorithms.igpo import IGPOConfig

    assert DiffuGRPOConfig().estimator == "one_step" and IGPOConfig(estimator="one_step").estimator_samples == 1
    with pytest.raises(ValueError, match="registered: coupled, mc_elbo, one_step"):
        DiffuGRPOConfig(estimator="nope")
    assert IGPOConfig(estimator="mc_elbo", estimator_samples=4).estimator_samples == 4
    with pytest.raises(ValueError):
        DiffuGRPOConfig(estimator_samples=0)


def test_without_cache_or_threshold_the_engine_samples_as_the_plain_sampler(model_dir):
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=ANSWER)
    got = engine(model_dir).generate(PROMPTS, spec)
    via_settings = make_engine("diffusion", str(model_dir), seed=3, settings=EngineSettings(
        answer_length=ANSWER, estimator="one_step", options=dict(DiffusionSamplerConfig(block_length=4, steps=4).model_dump())))
    again = via_settings.generate(PROMPTS, spec)
    # The plain sampler called directly, with the engine's model and seed: the same tokens and estimates.
    e = engine(model_dir)
    rows = [p for p in PROMPTS for _ in range(2)]
    want = diffusion_sample(e._logits, rows, mask_id=e.mask_id, pad_id=e.pad_id, gen_length=ANSWER, block_length=4,
                            steps=4, temperature=1.0, generator=torch.Generator().manual_seed(3))
    _, _, positions = answer_layout(rows, ANSWER, e.pad_id, e.mask_id)
    ids, attention, _ = answer_layout(rows, ANSWER, e.pad_id, e.mask_id)
    with torch.no_grad():
        want_lp = one_step_logprobs(e._logits(ids, attention), positions, want.tokens)
    flat, flat_again = [c for g in got for c in g], [c for g in again for c in g]
    for i, (c, c2) in enumerate(zip(flat, flat_again)):
        assert c.token_ids == want.tokens[i, : len(c.token_ids)].tolist() and c.token_ids == c2.token_ids
        assert c.logprobs == want_lp[i, : len(c.token_ids)].tolist() == c2.logprobs
        assert c.sampler_calls == 2.0  # 4 steps over 2 blocks


def test_threshold_on_the_tiny_model_commits_at_least_one_token_per_call(model_dir):
    e = engine(model_dir, threshold=0.9, cache="dual")
    assert type(e.model).__name__ == "BertForMaskedLM"  # no cache for it: the plain loader
    rows = [p for p in PROMPTS for _ in range(3)]
    sample, calls = e._sample(rows, SamplingSpec(n=1, temperature=1.0, max_tokens=ANSWER), None)
    assert sample.cache_used == "none"
    assert (sample.tokens != e.mask_id).all()
    per_call = sample.committed.sum(0)
    assert (per_call >= 1).all() and int(sample.committed.sum()) == len(rows) * ANSWER
    assert all(1 <= c <= 4 for c in sample.calls_per_block) and calls == sum(sample.calls_per_block) / 2
    out = e.generate(PROMPTS, SamplingSpec(n=2, temperature=1.0, max_tokens=ANSWER))
    # At least one call per block; more than block_length when a call "commits" the mask token itself
    # (a random tiny model predicts it; the position then stays masked for the next call).
    assert all(c.sampler_calls >= 1 for g in out for c in g)


def test_a_llada_checkpoint_gets_the_cached_model(model_dir, tmp_path):
    from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=len(tokenizer),
                         mask_token_id=tokenizer.mask_token_id)
    LLaDAForDiffusion(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    e = MaskedDiffusionEngine(str(tmp_path), seed=0, answer_length=16, block_length=8, steps=16, cache="dual", threshold=0.5)
    assert isinstance(e.model, LLaDAForDiffusion)
    sample, _ = e._sample(PROMPTS, SamplingSpec(n=1, temperature=0.0, max_tokens=16), None)
    assert sample.cache_used == "dual" and (sample.tokens != e.mask_id).all()
    out = e.generate(PROMPTS, SamplingSpec(n=1, temperature=1.0, max_tokens=16))
    assert all(len(g) == 1 for g in out)


def test_a_saved_llada_checkpoint_loads_without_remote_code(model_dir, tmp_path):
    """model_type llada is registered with AutoModelForMaskedLM, so the learner and an engine without
    a cache load a checkpoint saved from rollouts.llada_model (as tiny-llada-chain-addition is)."""
    from rollouts.diffusion import load_masked_diffusion_model
    from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    saved = LLaDAForDiffusion(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=len(tokenizer),
                                          mask_token_id=tokenizer.mask_token_id)).eval()
    saved.save_pretrained(tmp_path)
    loaded = load_masked_diffusion_model(str(tmp_path), torch.float32)
    assert isinstance(loaded, LLaDAForDiffusion)
    ids = torch.tensor([PROMPTS[0] + [tokenizer.mask_token_id] * 4])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, saved(input_ids=ids).logits)


def test_estimator_one_step_rows_equal_todays_estimate(model_dir):
    e = engine(model_dir)
    completions = [c for g in e.generate(PROMPTS, SamplingSpec(n=2, temperature=1.0, max_tokens=ANSWER)) for c in g]
    rows = estimate_rows(e._logits, "one_step", [c.prompt_ids for c in completions], [c.token_ids for c in completions],
                         answer_length=ANSWER, pad_id=e.pad_id, mask_id=e.mask_id)
    for c, lp in zip(completions, rows):
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(c.logprobs), atol=1e-5, rtol=0)


def _learner_terms(policy, mb):
    """The learner's per-token estimator terms: its forward, scored as Learner.score scores it."""
    from rl.core.batch import PolicyOutputs

    def scores(hidden, weight, estimator_passes=None):
        out = PolicyOutputs(hidden, weight, 1.0, estimator_passes=estimator_passes)
        return out.token_logprobs_and_entropy(mb.completion_ids, mb.completion_mask)[0]

    return scores if policy is None else policy(mb=mb, fn=scores)


@pytest.mark.parametrize("name", ["mc_elbo", "coupled"])
def test_a_random_estimator_is_the_same_in_the_engine_and_the_learner(model_dir, name):
    from rl.learner.model import DiffusionForward, _DiffusionPolicy

    e = engine(model_dir, estimator=name, estimator_samples=3, prompt_mask_prob=0.3)
    completions = [c for g in e.generate(PROMPTS, SamplingSpec(n=2, temperature=1.0, max_tokens=ANSWER)) for c in g]
    scored = e.score([ScoringRequest(c.prompt_ids, c.token_ids) for c in completions])
    lm = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    policy = _DiffusionPolicy(lm, DiffusionForward(ANSWER, e.mask_id, 0.3, estimator=name, estimator_samples=3), e.pad_id)
    batch = SequenceBatch([c.prompt_ids + c.token_ids for c in completions], [len(c.prompt_ids) for c in completions])
    mb = MicroBatch.from_sequences(batch, e.pad_id)
    with torch.no_grad():
        learner = _learner_terms(policy, mb)
    for i, (c, sc) in enumerate(zip(completions, scored)):
        assert len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(sc), atol=1e-6, rtol=0)
        torch.testing.assert_close(learner[i, : len(sc)].double(), torch.tensor(sc, dtype=torch.float64), atol=1e-5, rtol=0)
    # Not the one-step estimate.
    one = estimate_rows(e._logits, "one_step", [c.prompt_ids for c in completions], [c.token_ids for c in completions],
                        answer_length=ANSWER, pad_id=e.pad_id, mask_id=e.mask_id, prompt_mask_prob=0.3)
    assert any(not torch.allclose(torch.tensor(a), torch.tensor(b)) for a, b in zip(one, scored))


@pytest.mark.parametrize("name,n", [("mc_elbo", 2), ("coupled", 1)])
def test_the_learner_trains_a_random_estimator_with_its_gradient(model_dir, name, n):
    """Value and gradient of the training forward's terms against the estimator run row by row,
    differentiably, through the plain model (the reference: one sequence, one forward per pass)."""
    from rl.learner.model import DiffusionForward, _DiffusionPolicy
    from rollouts.estimators import get_estimator
    from rollouts.estimators.rows import row_generator

    torch.manual_seed(0)
    prompts, completions = [[7, 8, 9, 10, 11], [15, 16, 17], [4, 5]], [[20, 21, 22, 23, 24, 25], [30, 31, 32], [40, 41, 42, 43]]
    lm = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pad, mask = tok.pad_token_id, tok.mask_token_id
    policy = _DiffusionPolicy(lm, DiffusionForward(ANSWER, mask, estimator=name, estimator_samples=n), pad)
    weights = torch.randn(len(prompts), ANSWER, dtype=torch.float64)  # a loss that weighs every term differently
    mb = MicroBatch.from_sequences(SequenceBatch([p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts]), pad)
    terms = _learner_terms(policy, mb)
    (terms * weights[:, : terms.shape[1]] * mb.completion_mask).sum().backward()
    got = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()

    reference = 0
    estimator = get_estimator(name)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids, attention, positions = answer_layout([p], ANSWER, pad, mask)
        row = estimator(lambda x, a: lm(input_ids=x, attention_mask=a).logits, ids, attention, positions[:, : len(c)],
                        torch.tensor([c]), mask_id=mask, n=n, generator=row_generator(c, 0))
        torch.testing.assert_close(terms[i, : len(c)].detach(), row[0].detach(), atol=1e-9, rtol=0)
        reference = reference + (row[0] * weights[i, : len(c)]).sum()
    reference.backward()
    for g, p in zip(got, lm.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-9, rtol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)


def test_the_fast_recipe_is_igpo_llada_with_the_fast_sampler():
    from rl.config import load_config

    fast, paper = load_config("igpo_llada_fast"), load_config("igpo_llada")
    assert (fast.rollout.diffusion.cache, fast.rollout.diffusion.threshold) == ("dual", 0.9)
    assert (paper.rollout.diffusion.cache, paper.rollout.diffusion.threshold) == ("none", None)
    a, b = fast.model_dump(), paper.model_dump()
    for d in (a, b):
        d["rollout"]["diffusion"].pop("cache"), d["rollout"]["diffusion"].pop("threshold"), d.pop("recipe")
    assert a == b
