"""Rollout engines and the Ray pool, checked against a plain transformers forward of the same weights."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

from rollouts import RolloutEngineError, RolloutPool, make_engine
from rl.core.types import SamplingSpec, ScoringRequest

TOL = 1e-4
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from rl.demo.tiny import build_model

    root = tmp_path_factory.mktemp("rollout_models")
    return {
        "tied": str(build_model(root / "tied", arch="qwen3", tied=True)),
        "untied": str(build_model(root / "untied", arch="llama", tied=False)),
    }


@pytest.fixture(scope="module")
def vllm_pools(ray_session, tiny_models):
    # Two engines on the tied model, so that splitting, ordering and pushing to every engine are exercised.
    pools = {
        "tied": RolloutPool("vllm", tiny_models["tied"], num_engines=2, max_model_len=256, kv_cache_gb=0.25, timeout_s=180),
        "untied": RolloutPool("vllm", tiny_models["untied"], max_model_len=256, kv_cache_gb=0.25, timeout_s=180),
    }
    yield pools
    for pool in pools.values():
        pool.close()


def load_learner(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def pushed_weights(model) -> dict:
    """What a learner sending each parameter once pushes: a tied model's lm_head is not in it."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def scoring_requests() -> list[ScoringRequest]:
    g = torch.Generator().manual_seed(1)
    return [
        ScoringRequest(prompt_ids=p, token_ids=torch.randint(0, 300, (n,), generator=g).tolist())
        for p, n in zip(PROMPTS + [[40, 41]], [6, 12, 3, 9, 1])
    ]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1] / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def max_gap(got: list[list[float]], want: list[torch.Tensor]) -> float:
    assert [len(g) for g in got] == [len(w) for w in want]
    return max((torch.tensor(g) - w).abs().max().item() for g, w in zip(got, want))


def reference_scores(model, requests) -> list[torch.Tensor]:
    return [hf_logprobs(model, r.prompt_ids, r.token_ids) for r in requests]


def check_score_tracks_updates(engine, learner, push, steps: int = 3) -> None:
    requests = scoring_requests()
    previous = reference_scores(learner, requests)
    for step in range(steps):
        perturb(learner, seed=step)
        want = reference_scores(learner, requests)
        assert max_gap([w.tolist() for w in want], previous) > 0.1, "perturbation too small to test anything"
        push(learner)
        assert max_gap(engine.score(requests), want) < TOL, f"engine stale after update {step}"
        previous = want


def check_completions(results, prompts, spec: SamplingSpec, learner, eos_id: int) -> None:
    assert len(results) == len(prompts)
    raw_gap = 0.0
    for prompt, group in zip(prompts, results):
        assert len(group) == spec.n
        for c in group:
            assert c.prompt_ids == prompt
            assert 1 <= len(c.token_ids) <= spec.max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert eos_id not in c.token_ids[:-1]
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos_id else "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == spec.max_tokens
            want = hf_logprobs(learner, prompt, c.token_ids, spec.temperature)
            assert max_gap([c.logprobs], [want]) < TOL
            raw_gap = max(raw_gap, max_gap([c.logprobs], [hf_logprobs(learner, prompt, c.token_ids)]))
    assert raw_gap > 1e-2, "temperature made no difference: the logprob check cannot tell T=0.7 from T=1"
    samples = {tuple(c.token_ids) for group in results for c in group}
    assert len(samples) > len(prompts), "the n completions of a prompt are not independent samples"
    assert any(c.finish_reason == "length" for group in results for c in group)


def check_top_k_logprobs(engine, learner) -> None:
    """With a cut, logprobs are of the renormalised top-k distribution, as documented in rollouts.engine."""
    spec = SamplingSpec(n=2, temperature=0.7, top_k=5, max_tokens=5)
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, spec)):
        for c in group:
            assert max_gap([c.logprobs], [hf_logprobs(learner, prompt, c.token_ids, 0.7, top_k=5)]) < TOL


def test_import_is_light():
    code = "import sys, rollouts; rollouts.RolloutEngine; assert not {'vllm', 'ray'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_vllm_score_tracks_weight_updates(vllm_pools, tiny_models, which):
    pool = vllm_pools[which]
    learner = load_learner(tiny_models[which])
    check_score_tracks_updates(pool, learner, lambda m: pool.load_weights(pushed_weights(m)))


@pytest.mark.slow
def test_vllm_tied_embeddings_need_the_lm_head_repack(vllm_pools, tiny_models):
    pool = vllm_pools["tied"]
    learner = load_learner(tiny_models["tied"])
    requests = scoring_requests()
    perturb(learner, seed=10)
    # The engine sets _needs_repack for a tied model on CPU; clearing it in the actor skips the repack.
    pool.apply(lambda engine: setattr(engine, "_needs_repack", False))
    try:
        pool.load_weights(pushed_weights(learner))
        stale = max_gap(pool.score(requests), reference_scores(learner, requests))
    finally:
        pool.apply(lambda engine: setattr(engine, "_needs_repack", True))
    assert stale > 0.3, "without the repack the tied lm_head should keep its old packed weights"
    pool.load_weights(pushed_weights(learner))
    assert max_gap(pool.score(requests), reference_scores(learner, requests)) < TOL


@pytest.mark.slow
def test_vllm_generate(vllm_pools, tiny_models):
    pool = vllm_pools["tied"]
    learner = load_learner(tiny_models["tied"])
    pool.load_weights(learner.state_dict())
    spec = SamplingSpec(n=3, temperature=0.7, max_tokens=6)
    check_completions(pool.generate(PROMPTS, spec), PROMPTS, spec, learner, learner.config.eos_token_id)
    check_top_k_logprobs(pool, learner)


@pytest.mark.slow
def test_vllm_rejects_a_bad_state_dict_and_keeps_working(vllm_pools, tiny_models):
    pool = vllm_pools["tied"]
    learner = load_learner(tiny_models["tied"])
    with pytest.raises(RolloutEngineError, match=r"vllm engine [01] failed in load_weights.*model\.bogus\.weight"):
        pool.load_weights({**learner.state_dict(), "model.bogus.weight": torch.zeros(3)})
    with pytest.raises(RolloutEngineError, match=r"model\.norm\.weight: got \(7,\)"):
        pool.load_weights({"model.norm.weight": torch.zeros(7)})
    perturb(learner, seed=20)
    pool.load_weights(learner.state_dict())
    requests = scoring_requests()
    assert max_gap(pool.score(requests), reference_scores(learner, requests)) < TOL


@pytest.mark.slow
def test_pool_reports_a_bad_model_path(ray_session, tmp_path):
    start = time.monotonic()
    with pytest.raises(RolloutEngineError, match=rf"vllm engine 0 failed in start.*{re.escape(str(tmp_path))}"):
        RolloutPool("vllm", str(tmp_path), timeout_s=60)
    assert time.monotonic() - start < 60


def test_hf_engine(tiny_models):
    engine = make_engine("hf", tiny_models["tied"], seed=0, max_model_len=256)
    learner = load_learner(tiny_models["tied"])
    spec = SamplingSpec(n=2, temperature=0.7, max_tokens=5)
    check_completions(engine.generate(PROMPTS, spec), PROMPTS, spec, learner, learner.config.eos_token_id)
    check_top_k_logprobs(engine, learner)
    check_score_tracks_updates(engine, learner, lambda m: engine.load_weights(pushed_weights(m)), steps=2)
    with pytest.raises(ValueError, match=r"model\.bogus\.weight"):
        engine.load_weights({"model.bogus.weight": torch.zeros(3)})
    engine.close()
