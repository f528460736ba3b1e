"""LoRA on the DeepSpeed learner, against plain peft + PyTorch and hand-merged weights.

Only the adapters may train; the engines get merged weights under the base model's HF names,
W + (alpha/r) * B @ A, computed here by hand from the saved adapter; a plain transformers model
holding them must give the peft model's logits; the frozen reference (and frozen teacher) is the
base model with adapters disabled, unchanged by training. One ZeRO-2 rank in this process, then
Ray groups of 1 and 2 ranks (ZeRO-2 and ZeRO-3).
"""
import json
import sys
from types import SimpleNamespace

import pytest
import ray
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl.core.batch import SequenceBatch
from rl.algorithms.opsd import TeacherConfig
from rl.config import LearnerConfig, LoraConfig
from rl.learner.group import LearnerGroup, LearnerWorker, free_port
from tests.batches import varied_batch

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)  # scaling 2, every attention and MLP projection
# The same settings written out for peft by hand, so that a wrong config-to-peft mapping in the
# library cannot pass on both sides.
PEFT_SETTINGS = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SCALING = 8 / 4  # alpha / r
TEMPERATURE = 0.7
LR = 1e-2  # adapters start at B = 0: a larger lr makes B @ A clearly non-zero in two steps
ATOL = 1e-6
GRAD_SCALE = 1e4  # gradients far above Adam's eps, so steps compare tightly (see test_learner)
MAX_GRAD_NORM = 1e3


STEP_BATCHES = [varied_batch(1, GRAD_SCALE, teacher_is_student=True), varied_batch(2, GRAD_SCALE, teacher_is_student=True)]


def token_mean_pg_loss(out, mb):
    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    loss = -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer
    return loss, {"tokens": mb.completion_mask.sum().item()}


def learner_cfg(**kw) -> LearnerConfig:
    base = dict(lr=LR, weight_decay=0.1, betas=(0.8, 0.95), max_grad_norm=MAX_GRAD_NORM, micro_batch_size=2)
    return LearnerConfig(**{**base, **kw})



# ---------------------------------------------------------------------------------------------
# Plain references


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def plain_peft(model_dir):
    """peft built directly from the hand-written settings; same seed before loading as the
    learner, so the same adapter initialisation."""
    import peft

    torch.manual_seed(0)
    return peft.get_peft_model(load(model_dir), peft.LoraConfig(**PEFT_SETTINGS))


def plain_steps(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.8, 0.95), weight_decay=0.1)
    for batch in STEP_BATCHES:
        total = torch.zeros(())
        for ids, p, adv in zip(batch.input_ids, batch.prompt_lens, batch.token_fields["advantages"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1] / TEMPERATURE
            logp = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - p), torch.tensor(ids[p:])]
            total = total - (torch.tensor(adv) * logp).sum()
        opt.zero_grad()
        (total / batch.loss_normalizer).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
    return model


@torch.no_grad()
def plain_logprobs(model, batch: SequenceBatch) -> list[torch.Tensor]:
    rows = []
    for ids, p in zip(batch.input_ids, batch.prompt_lens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, p - 1 : len(ids) - 1] / TEMPERATURE
        rows.append(torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - p), torch.tensor(ids[p:])])
    return rows


@torch.no_grad()
def plain_hidden(model, batch: SequenceBatch) -> list[torch.Tensor]:
    rows = []
    for ids, p in zip(batch.input_ids, batch.prompt_lens):
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        rows.append(hidden[p - 1 : len(ids) - 1])
    return rows


def hand_merged(initial: dict, adapter_dir) -> dict:
    """W + (alpha / r) * B @ A for every adapted layer, from the adapter files alone."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # What the library wrote must be the hand-written settings; the scaling is ours, not the file's.
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        PEFT_SETTINGS["r"], PEFT_SETTINGS["lora_alpha"], sorted(PEFT_SETTINGS["target_modules"]))
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = dict(initial)
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            merged[f"{layer}.weight"] = initial[f"{layer}.weight"] + SCALING * b @ a
    return merged


def assert_state_close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_rows_close(actual, expected, atol: float = 1e-5) -> None:
    assert [len(r) for r in actual] == [len(r) for r in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.as_tensor(a), e, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(tiny_model):
    initial = load(tiny_model)
    trained = plain_steps(plain_peft(tiny_model))
    return SimpleNamespace(
        initial=initial.state_dict(),
        initial_logprobs=plain_logprobs(initial, STEP_BATCHES[0]),
        initial_hidden=plain_hidden(initial, STEP_BATCHES[0]),
        trained={k: v.detach().clone() for k, v in trained.named_parameters()},
        merged=trained.merge_and_unload().state_dict(),
    )


# ---------------------------------------------------------------------------------------------
# One ZeRO-2 rank in this process


CAPTURED: list = []


def capturing_pg_loss(out, mb):
    CAPTURED.append((out.hidden.detach().clone(), out.teacher_hidden.clone(), out.teacher_lm_head_weight, mb.completion_mask))
    return token_mean_pg_loss(out, mb)


def per_sequence(index: int) -> list[torch.Tensor]:
    return [row[: int(n)] for c in CAPTURED for row, n in zip(c[index], c[3].sum(-1))]


def test_only_adapters_train_and_the_frozen_teacher_is_the_base(tiny_model, reference):
    worker = LearnerWorker(str(tiny_model), learner_cfg(), "float32", 0, 1, "127.0.0.1", free_port(), 0, 10,
                           with_reference=True, teacher=TeacherConfig(kind="frozen"), lora=LORA)
    assert worker.reference is None  # the frozen model is the policy with adapters disabled: no copy
    initial = {k: v.detach().clone() for k, v in worker.engine.module.lm.named_parameters()}
    for batch in STEP_BATCHES:
        worker.train_step(batch, token_mean_pg_loss, TEMPERATURE)
    final = dict(worker.engine.module.lm.named_parameters())
    for name, value in final.items():
        if ".lora_" in name:
            torch.testing.assert_close(value, reference.trained[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(value, initial[name]), name
    assert all((final[k] - initial[k]).abs().max() > 1e-3 for k in final if ".lora_B." in k)

    CAPTURED.clear()
    worker.train_step(STEP_BATCHES[0], capturing_pg_loss, TEMPERATURE)
    assert_rows_close(per_sequence(1), reference.initial_hidden)
    assert all(c[2] is None for c in CAPTURED)  # the teacher's head is the policy's (not adapted)
    assert max((h - w).abs().max() for h, w in zip(per_sequence(0), reference.initial_hidden)) > 1e-3
    ref_logprobs, _ = worker.compute_logprobs(STEP_BATCHES[0], TEMPERATURE, reference=True)
    assert_rows_close(ref_logprobs, reference.initial_logprobs)


# ---------------------------------------------------------------------------------------------
# Ray groups


@pytest.fixture(scope="module", params=[(1, 2), (2, 2), (2, 3)], ids=lambda c: f"{c[0]}rank-zero{c[1]}")
def trained_group(request, ray_session, tiny_model, tmp_path_factory):
    num_learners, stage = request.param
    cfg = learner_cfg(num_learners=num_learners, zero_stage=stage, micro_batch_size=1)
    group = LearnerGroup(str(tiny_model), cfg, "float32", seed=0, total_steps=2, with_reference=True,
                         teacher=TeacherConfig(kind="frozen"), lora=LORA)
    try:  # closed also when a step fails: its actors would hold the session's CPUs from the next group
        for batch in STEP_BATCHES:
            group.train_step(batch, token_mean_pg_loss, TEMPERATURE)
        out = tmp_path_factory.mktemp("saved") / "hf"
        group.save_hf(str(out), adapter=True)
        yield SimpleNamespace(group=group, out=out, state=group.full_state_dict())
    finally:
        group.close()


def test_merged_weights_are_base_plus_scaled_adapter_product(trained_group, reference):
    expected = hand_merged(reference.initial, trained_group.out / "adapter")
    assert_state_close(trained_group.state, expected)
    assert_state_close(trained_group.state, reference.merged)  # and the step matches plain peft
    assert max((trained_group.state[k] - reference.initial[k]).abs().max() for k in expected) > 1e-4


def test_merged_folder_gives_the_peft_models_logits(trained_group, tiny_model):
    merged = load(trained_group.out)
    assert_state_close(merged.state_dict(), trained_group.state, atol=0)
    peft_model = PeftModel.from_pretrained(load(tiny_model), str(trained_group.out / "adapter"))
    batch = STEP_BATCHES[0]
    assert_rows_close(plain_logprobs(merged, batch), plain_logprobs(peft_model, batch))
    logprobs, _ = trained_group.group.compute_logprobs(batch, TEMPERATURE)
    assert_rows_close(logprobs, plain_logprobs(merged, batch))


def test_reference_is_the_base_model_after_training(trained_group, reference):
    logprobs, _ = trained_group.group.compute_logprobs(STEP_BATCHES[0], TEMPERATURE, reference=True)
    assert_rows_close(logprobs, reference.initial_logprobs)
