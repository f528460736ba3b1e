"""The GPU recipes' combinations through `train()` on a tiny CPU model (vLLM + DeepSpeed + Ray):
the KL term's frozen reference; LoRA in the loop (merged pushes and the sync check) with
`updates_per_batch=2` and learner-computed old log-probs (igpo_llada's shape); opsd_qwen as it
stands (LoRA, bf16, the clipped forward KL). Two steps each (OPSD: enough to see it learn).

What the loop does is observed from here by wrapping public calls (the pool's weight push, the
learner group's train_step): the pushed weights and the batches trained on are then checked
against plain transformers forwards written here.
"""
import json
import sys

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl.config import load_config
from rl.demo.tiny import addition_rows

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def warmed(warmed_addition_model, tmp_path_factory):
    # Partly right on `a+b=`: rewards vary within groups, so every step has a gradient.
    data = tmp_path_factory.mktemp("combos") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(200, seed=5)))
    return warmed_addition_model, data


def _grpo(model, data, out, steps, extra=()):
    return load_config(None, [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", f"train.steps={steps}",
        "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-2", "learner.warmup_steps=0",
        "reward.workers=0", f"tracking.output_dir={out}", "tracking.run_name=run",
        # Pushes are observed where the object store receives them; the collective backend's
        # bit-exact delivery is tested in tests/integration/test_weight_sync.py.
        "sync.backend=object_store", *extra,
    ])


def _run(cfg, out):
    from rl.loop.trainer import train

    run_dir = out / "run"
    run_dir.mkdir()
    train(cfg, run_dir)
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def observed(monkeypatch):
    """Records every weight push (a CPU copy) and every train_step's batch, loss and metrics."""
    from rl.learner.group import LearnerGroup
    from rollouts.pool import RolloutPool

    seen = {"pushes": [], "steps": []}
    push, step = RolloutPool.load_weights, LearnerGroup.train_step

    def recording_push(pool, state_dict):
        seen["pushes"].append({k: v.detach().clone() for k, v in state_dict.items()})
        return push(pool, state_dict)

    def recording_step(group, batch, loss_fn, *args, **kwargs):
        result = step(group, batch, loss_fn, *args, **kwargs)
        metrics = result[0] if kwargs.get("return_logprobs") else result  # (metrics, kept log-probs)
        seen["steps"].append((batch, dict(metrics)))  # the loop pops keys from its own copy
        return result

    monkeypatch.setattr(RolloutPool, "load_weights", recording_push)
    monkeypatch.setattr(LearnerGroup, "train_step", recording_step)
    return seen


@torch.no_grad()
def plain_logprobs(model_dir, state, batch, temperature=1.0) -> list[torch.Tensor]:
    """Per completion token: log_softmax(logits / T)[token] of a plain transformers forward."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    rows = []
    for ids, p in zip(batch.input_ids, batch.prompt_lens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1] / temperature
        rows.append(torch.log_softmax(logits, -1)[torch.arange(len(ids) - p), torch.tensor(ids[p:])])
    return rows


def test_kl_reference_is_the_frozen_initial_policy(warmed, ray_session, tmp_path, observed):
    """Step 2's ref_logprobs are the initial model's (not the policy's), the policy has moved away
    from them, and the logged `kl` is the k3 mean computed here from those two."""
    model, data = warmed
    _, records = _run(_grpo(model, data, tmp_path, 2, ["grpo.kl_coef=0.1", "grpo.kl_kind=k3"]), tmp_path)
    (batch1, _), (batch2, _) = observed["steps"]
    ref2 = [torch.tensor(r) for r in batch2.token_fields["ref_logprobs"]]
    initial = plain_logprobs(model, None, batch2)
    policy = plain_logprobs(model, observed["pushes"][0], batch2)  # the weights step 2 trained from
    assert max((a - b).abs().max().item() for a, b in zip(ref2, initial)) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(ref2, policy)) > 1e-2
    log_ratio = torch.cat(policy) - torch.cat(initial)
    k3 = torch.expm1(-log_ratio) + log_ratio
    assert records[1]["kl"] == pytest.approx(k3.mean().item(), rel=1e-3)
    assert records[0]["kl"] < 1e-8 < 1e-4 < records[1]["kl"]  # step 1 trains the initial policy itself


def test_lora_with_two_updates_per_batch(warmed, ray_session, tmp_path, observed):
    """igpo_llada's loop shape: LoRA adapters, two updates on each batch from learner-computed old
    log-probs, a KL term; every push is the merged model and passes the sync check at fp32."""
    model, data = warmed
    extra = ["model.lora.enabled=true", "model.lora.rank=2", "model.lora.alpha=4", "grpo.updates_per_batch=2",
             "grpo.kl_coef=0.01", "sync.max_logprob_gap=1e-3"]
    run_dir, records = _run(_grpo(model, data, tmp_path, 2, extra), tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(r["logprob_gap"] < 1e-4 for r in records)

    # Two updates on each step's one batch; old log-probs from the learner before the first.
    assert len(observed["steps"]) == 4
    for (first_batch, first), (second_batch, second) in zip(observed["steps"][::2], observed["steps"][1::2]):
        assert first_batch is second_batch
        old = [torch.tensor(r) for r in first_batch.token_fields["old_logprobs"]]
        engine = [torch.tensor(r) for r in first_batch.token_fields["rollout_logprobs"]]
        # The policy that sampled (the merged push the engines hold), scored by the learner: equal at fp32.
        assert max((a - b).abs().max().item() for a, b in zip(old, engine)) < 1e-4
        assert first["clip_fraction_sum"] == 0  # update 1: ratio exactly 1
        assert second["loss"] != first["loss"]  # update 2 sees the moved policy through the ratio
    assert sum(second["clip_fraction_sum"] for _, second in observed["steps"][1::2]) > 0

    # Merged pushes under the base model's names: W + (alpha/r) B A, a rank <= 2 change of every
    # adapted projection, nothing else moved.
    initial = load_file(str(model / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert len(observed["pushes"]) == 2
    for pushed in observed["pushes"] + [final]:
        assert not any(".lora_" in k or "base_layer" in k for k in pushed)
    adapted = [k for k in initial if k.endswith("_proj.weight")]
    assert len(adapted) == 14  # 7 projections x 2 layers
    for name, value in initial.items():
        delta = final[name] - value
        if name in adapted:
            assert delta.abs().max() > 1e-4 and torch.linalg.matrix_rank(delta, atol=1e-6) <= 2, name
        else:
            assert torch.equal(final[name], value), name  # embeddings and norms never train


def test_opsd_qwen_recipe_in_bf16_with_lora_lowers_divergence(tiny_model, ray_session, tmp_path, observed):
    """opsd_qwen as it stands (forward KL clipped at 0.05 per entry, the release's token-mean aggregation, frozen
    teacher, LoRA, bf16, T 1.1 / top-p 0.95 / top-k 20) with the model, data and sizes of a tiny
    run: the bf16 run of the recipes, and OPSD with the clip on, end to end."""
    model, data = tiny_model, tmp_path / "train.jsonl"
    rows = [{**r, "problem": r["question"], "solution": f"{r['question']}{r['answer']}"} for r in addition_rows(300, seed=3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("opsd_qwen", [
        f"model.path={model}", "model.lora.rank=8", "model.lora.alpha=16",
        f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=200",
        "rollout.max_tokens=8", "rollout.kv_cache_gb=0.25", "learner.lr=1e-2", "learner.max_grad_norm=1.0",
        "learner.micro_batch_size=32", "reward.workers=0", "train.steps=10", "train.prompts_per_step=32",
        "checkpoint.every_steps=0", f"tracking.output_dir={tmp_path}", "tracking.run_name=run",
        "sync.backend=object_store",  # pushes observed where the object store receives them
    ])
    assert (cfg.opsd.divergence, cfg.opsd.clip, cfg.opsd.aggregation, cfg.opsd.teacher.kind, cfg.model.dtype,
            cfg.model.lora.enabled) == ("forward_kl", 0.05, "code", "frozen", "bfloat16", True)
    _, records = _run(cfg, tmp_path)
    div = [r["divergence"] for r in records]
    print("clipped divergence per step:", [round(d, 4) for d in div])
    assert all(torch.isfinite(torch.tensor(div)))
    assert sum(div[-3:]) / 3 < 0.7 * sum(div[:3]) / 3, div
    assert len(observed["pushes"]) == 10
    for pushed in observed["pushes"]:
        assert {v.dtype for v in pushed.values()} == {torch.bfloat16}
    # bf16 engines and learner agree up to rounding, inside the guard's default limit (0.05).
    assert all(0 < r["logprob_gap"] < 0.05 for r in records), [r["logprob_gap"] for r in records]
