"""The paper recipes resolve to the released code's values, setting by setting.

Each entry is copied by hand from the release at a pinned commit, with its file:line, so that a
changed default or recipe fails here with the setting's name and its source. `Released` rows are
values we match; `Differs` rows are deliberate differences, pinned to our value with the reason
(docs/paper_settings.md says the same). A recipe's evaluation protocol is checked the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rl.config import load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "paper_settings.md"


@dataclass(frozen=True)
class Released:
    key: str  # dotted config key of the recipe's resolved config (the algorithm section by its name)
    value: object  # the release's value, which ours equals
    source: str  # "repo@commit path:line"


@dataclass(frozen=True)
class Differs:
    key: str
    ours: object
    released: object
    source: str
    why: str


# Commits read (see docs/paper_settings.md for what each file is).
OPSD = "siyan-zhao/OPSD@85d6bf9"  # the author's code behind the v3 paper (see docs/paper_settings.md)
OPSD_EVAL = "siyan-zhao/OPSD@7448751"
IGPO = "facebookresearch/igpo@e85eaea"
D1 = "dllm-reasoning/d1@837888f"

SETTINGS: dict[str, list] = {}


def resolve(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def _cases():
    return [(recipe, entry) for recipe, entries in SETTINGS.items() for entry in entries]


def pytest_generate_tests(metafunc):
    # At collection, after every block below has added its recipe's entries.
    if "entry" in metafunc.fixturenames:
        metafunc.parametrize("recipe, entry", _cases(), ids=[f"{r}:{e.key}" for r, e in _cases()])


def test_recipe_resolves_to_the_released_value(recipe, entry):
    value = resolve(load_config(recipe), entry.key)
    expected = entry.value if isinstance(entry, Released) else entry.ours
    if isinstance(expected, float):
        assert value == pytest.approx(expected), f"{recipe}: {entry.key} is {value!r}, the release's is {expected!r} ({entry.source})"
    else:
        assert value == expected, f"{recipe}: {entry.key} is {value!r}, expected {expected!r} ({entry.source})"


def test_every_source_cited_here_is_cited_in_the_doc():
    doc = DOC.read_text()
    missing = sorted({e.source.split("@", 1)[1].split(" ", 1)[1] for _, e in _cases()
                      if e.source.split("@", 1)[1].split(" ", 1)[1] not in doc})
    assert not missing, f"docs/paper_settings.md does not cite: {missing}"


def test_the_doc_marks_equal_only_where_values_are_equal():
    """Every deliberate difference has a row in docs/paper_settings.md, and its release cell is not '='."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in DOC.read_text().splitlines()
            if line.startswith("| `")]
    for recipe, entries in SETTINGS.items():
        for e in entries:
            if isinstance(e, Differs):
                mine = [r for r in rows if r[0].startswith(f"`{e.key}`")]
                assert mine, f"docs/paper_settings.md has no row for `{e.key}` ({recipe})"
                assert any(not r[2].startswith("=") for r in mine), f"`{e.key}` differs from the release, yet its row says '='"

# --- OPSD, its GRPO and SFT baselines, and their evaluation protocol ---
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
OPSD_EVAL_PROTOCOL = [
    Released("eval.prompt_format", "chat", f"{OPSD_EVAL} eval/evaluate_math.py:340-342"),
    Released("eval.prompt_template", "{problem}\n\n" + BOXED, f"{OPSD_EVAL} eval/evaluate_math.py:340-342"),
    Released("eval.system_prompt", None, f"{OPSD_EVAL} eval/evaluate_math.py:340-342"),
    Released("eval.enable_thinking", True, f"{OPSD_EVAL} eval/evaluate_math.py:577-581"),
    Released("eval.max_tokens", 38912, f"{OPSD_EVAL} eval/evaluate_math.py:571-576"),
    Released("eval.temperature", 1.0, f"{OPSD_EVAL} eval/run_eval.sh:10"),
    Released("eval.top_p", 0.95, f"{OPSD_EVAL} eval/evaluate_math.py:653-654"),
    Released("eval.top_k", -1, f"{OPSD_EVAL} eval/evaluate_math.py:598-600"),
    Released("eval.k", 12, f"{OPSD_EVAL} eval/run_eval.sh:20"),
    Released("eval.benchmarks", ["aime24", "aime25", "hmmt25"], f"{OPSD_EVAL} eval/evaluate_math.py:234-242"),
    Released("eval.grader", "last_boxed_correct", f"{OPSD_EVAL} eval/evaluate_math.py:15-86"),
    Released("eval.assistant_prefix", "", f"{OPSD_EVAL} eval/evaluate_math.py:340-342"),
]
SETTINGS["opsd_qwen"] = OPSD_EVAL_PROTOCOL + [
    Released("model.path", "Qwen/Qwen3-1.7B", f"{OPSD} scripts/run_opsd_1b.sh:7"),
    Released("model.lora.rank", 64, f"{OPSD} scripts/run_opsd_1b.sh:28-30"),
    Released("model.lora.alpha", 128, f"{OPSD} scripts/run_opsd_1b.sh:28-30"),
    Released("model.lora.target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             f"{OPSD} scripts/run_opsd_1b.sh:28-30"),
    Released("model.lora.dropout", 0.0, f"{OPSD} opsd_trainer.py:172"),
    Released("data.train", "siyanzhao/Openthoughts_math_30k_opsd", f"{OPSD} data_collator.py:54-55"),
    Released("data.prompt_template", "Problem: {problem}\n\n{instruction}", f"{OPSD} data_collator.py:58"),
    Released("data.instruction", BOXED, f"{OPSD} data_collator.py:58"),
    Released("data.enable_thinking", False, f"{OPSD} data_collator.py:58"),
    Released("opsd.teacher_enable_thinking", True, f"{OPSD} data_collator.py:28-34, 88-94"),
    Released("rollout.temperature", 1.1, f"{OPSD} scripts/run_opsd_1b.sh:31-33"),
    Released("rollout.top_p", 0.95, f"{OPSD} scripts/run_opsd_1b.sh:31-33"),
    Released("rollout.top_k", 20, f"{OPSD} scripts/run_opsd_1b.sh:31-33"),
    Released("rollout.max_tokens", 1024, f"{OPSD} scripts/run_opsd_1b.sh:16"),
    Released("opsd.divergence", "forward_kl", f"{OPSD} scripts/run_opsd_1b.sh:22"),
    Released("opsd.clip", 0.05, f"{OPSD} scripts/run_opsd_1b.sh:36"),
    Released("opsd.token_loss", "full", f"{OPSD} scripts/run_opsd_1b.sh:22"),
    Released("opsd.scale_logits_by_temperature", True, f"{OPSD} opsd_trainer.py:421-422"),
    Released("opsd.teacher.kind", "frozen", f"{OPSD} scripts/run_opsd_1b.sh:35"),
    Released("learner.max_grad_norm", 0.1, f"{OPSD} scripts/run_opsd_1b.sh:9"),
    Released("learner.betas", (0.9, 0.999), f"{OPSD} opsd_train.py (no optimizer arguments)"),
    Released("learner.weight_decay", 0.0, f"{OPSD} opsd_train.py (no optimizer arguments)"),
    Released("train.prompts_per_step", 32, f"{OPSD} scripts/run_opsd_1b.sh:3,10,12"),
    Released("train.steps", 100, f"{OPSD} scripts/run_opsd_1b.sh:15"),
    Differs("opsd.aggregation", "code", "token mean per micro-batch of 4, then the mean over micro-batches",
            f"{OPSD} opsd_trainer.py:467", "the step's token mean does not depend on how the learner cuts micro-batches"),
    Differs("learner.lr", 5e-6, "5e-6 decaying linearly over 30 epochs (99.6% at step 100)",
            f"{OPSD} scripts/run_opsd_1b.sh:8", "no schedule tied to an epoch count the run never reaches"),
]
SETTINGS["grpo_qwen"] = OPSD_EVAL_PROTOCOL + [
    Released("model.lora.rank", 64, f"{OPSD} scripts/run_grpo.sh:16-18"),
    Released("model.lora.alpha", 128, f"{OPSD} scripts/run_grpo.sh:16-18"),
    Released("data.question_key", "Question", f"{OPSD} grpo_train.py:117-132"),
    Released("data.answer_key", "Answer", f"{OPSD} grpo_train.py:117-132"),
    Released("data.prompt_template", "Problem: {problem}\n{instruction}", f"{OPSD} grpo_train.py:117-132"),
    Released("data.instruction", BOXED, f"{OPSD} grpo_train.py:117-132"),
    Released("data.enable_thinking", True, f"{OPSD} grpo_train.py:117-132"),
    Released("reward.functions.0.name", "boxed_after_think_correct", f"{OPSD} grpo_train.py:49-114"),
    Released("rollout.temperature", 1.2, f"{OPSD} scripts/run_grpo.sh:22"),
    Released("rollout.top_p", 1.0, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("rollout.top_k", -1, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("rollout.max_tokens", 16000, f"{OPSD} scripts/run_grpo.sh:20"),
    Released("grpo.group_size", 8, f"{OPSD} scripts/run_grpo.sh:21"),
    Released("grpo.loss_agg", "seq_mean_token_mean", f"{OPSD} scripts/run_grpo.sh:29"),
    Released("grpo.clip_low", 0.2, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("grpo.clip_high", 0.2, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("grpo.kl_coef", 0.0, f"{OPSD} scripts/run_grpo.sh:28"),
    Released("grpo.updates_per_batch", 2, f"{OPSD} scripts/run_grpo.sh:14"),
    Released("grpo.importance_sampling", "sequence_mask", f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("grpo.importance_cap", 3.0, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("learner.lr", 5e-6, f"{OPSD} scripts/run_grpo.sh:7"),
    Released("learner.max_grad_norm", 1.0, f"{OPSD} scripts/run_grpo.sh:1-31"),
    Released("train.prompts_per_step", 4, f"{OPSD} scripts/run_grpo.sh:3,8-9"),
    Released("train.steps", 250, f"{OPSD} scripts/run_grpo.sh:13"),  # paper v3 Table 6: 500 TRL steps = 250 x 2
    Differs("model.lora.dropout", 0.0, 0.05, f"{OPSD} scripts/run_grpo.sh:16-18",
            "the engines sample the merged weights without dropout; the importance ratios assume the same function"),
    Differs("grpo.advantage", "group_mean_std", "group_mean_std with std eps 1e-4", f"{OPSD} scripts/run_grpo.sh:30",
            "one epsilon (1e-6) for every recipe"),
    Differs("data.max_prompt_tokens", 2048, "ignored by TRL 0.26.0", f"{OPSD} scripts/run_grpo.sh:19",
            "a bound the engines' context needs; longer prompts are skipped and counted"),
]
SETTINGS["sft_qwen"] = OPSD_EVAL_PROTOCOL + [
    Released("data.prompt_template", "{problem}\n\n{instruction}", f"{OPSD} sft_train.py:23-43"),
    Released("data.enable_thinking", False, f"{OPSD} sft_train.py:23-43"),
    Released("sft.completion_only_loss", False, f"{OPSD} sft_train.py:23-43"),
    Released("model.lora.rank", 64, f"{OPSD} scripts/run_sft.sh:14-17"),
    Released("model.lora.alpha", 128, f"{OPSD} scripts/run_sft.sh:14-17"),
    Released("learner.lr", 5e-6, f"{OPSD} scripts/run_sft.sh:8"),
    Released("train.prompts_per_step", 64, f"{OPSD} scripts/run_sft.sh:9"),
    Released("sft.max_length", 16000, f"{OPSD} scripts/run_sft.sh:18"),
    Differs("train.steps", 100, "4 epochs", f"{OPSD} scripts/run_sft.sh:12", "the paper's 100 steps (v3 Table 7)"),
]

# --- IGPO and d1 ---
# IGPO at facebookresearch/igpo@e85eaea (run_igpo.sh flags over train.yaml), d1's diffu-GRPO at
# dllm-reasoning/d1@837888f (slurm_scripts/gsm_base.sbatch + slurm_scripts/train.yaml), and d1's
# evaluation, which IGPO's paper reports with. docs/paper_settings.md has the same rows.
D1_FORMAT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
D1_EVAL_PROTOCOL = [
    Released("eval.assistant_prefix", "<reasoning>", f"{D1} eval/gsm8k.py:62-66"),
    Released("eval.temperature", 0.0, f"{D1} eval/eval.py:50-59"),
    Released("eval.k", 1, f"{D1} eval/eval.py:50-59"),
    Released("eval.max_tokens", 256, f"{D1} eval/run_eval.sh:10,42"),
    Differs("eval.grader", {"gsm8k": "d1_gsm8k"}, "math500: the last box, else <answer>, then is_equiv",
            f"{D1} eval/parse_and_get_acc.py:43-75", "d1's MATH500 rule is not implemented; math-verify grades MATH500"),
]
LLADA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
IGPO_SETTINGS = D1_EVAL_PROTOCOL + [
    Released("model.path", "GSAI-ML/LLaDA-8B-Instruct", f"{IGPO} run_igpo.sh:133"),
    Released("model.dtype", "bfloat16", f"{IGPO} train_igpo.py:80-82"),
    Released("model.lora.rank", 128, f"{IGPO} train.yaml:9-11"),
    Released("model.lora.alpha", 64, f"{IGPO} train.yaml:9-11"),
    Released("model.lora.target_modules", LLADA_TARGETS, f"{IGPO} train_igpo.py:145"),
    Released("data.train", "meta-math/MetaMathQA", f"{IGPO} utils/data_utils.py:55"),
    Released("data.type_filter", ["GSM_AnsAug", "MATH_AnsAug"], f"{IGPO} utils/data_utils.py:55"),
    Released("data.dedupe_by", "query", f"{IGPO} utils/data_utils.py:60-70"),
    Released("rollout.temperature", 1.2, f"{IGPO} run_igpo.sh:5,146"),
    Released("rollout.max_tokens", 256, f"{IGPO} run_igpo.sh:5,150"),
    Released("rollout.diffusion.block_length", 32, f"{IGPO} run_igpo.sh:149"),
    Released("rollout.diffusion.steps", 128, f"{IGPO} trainer_igpo.py:1366"),
    Released("rollout.diffusion.remasking", "low_confidence", f"{IGPO} train.yaml:61"),
    Released("igpo.group_size", 8, f"{IGPO} run_igpo.sh:138"),
    Released("train.prompts_per_step", 64, f"{IGPO} run_igpo.sh:136-139"),
    Released("igpo.updates_per_batch", 4, f"{IGPO} run_igpo.sh:5,137"),
    Released("igpo.advantage", "group_mean", f"{IGPO} trainer_igpo.py:1906-1920"),
    Released("igpo.clip_low", 0.2, f"{IGPO} run_igpo.sh:143-144"),
    Released("igpo.clip_high", 0.2, f"{IGPO} run_igpo.sh:143-144"),
    Released("igpo.kl_coef", 0.01, f"{IGPO} run_igpo.sh:142"),
    Released("igpo.kl_kind", "k3", f"{IGPO} run_igpo.sh:142"),
    Released("igpo.prompt_mask_prob", 0.0, f"{IGPO} trainer_igpo.py:981-1025"),
    Released("igpo.loss_support", "whole_answer", f"{IGPO} trainer_igpo.py:617"),
    Released("igpo.loss_agg", "group_token_mean", f"{IGPO} trainer_igpo.py:681-686"),
    Released("igpo.replace_fraction", 0.5, f"{IGPO} run_igpo.sh:5,156"),
    Released("igpo.chunk_min", 5, f"{IGPO} run_igpo.sh:147-148"),
    Released("igpo.chunk_max", 10, f"{IGPO} run_igpo.sh:147-148"),
    Released("igpo.reveal_min", 0.2, f"{IGPO} run_igpo.sh:5,153-154"),
    Released("igpo.reveal_max", 0.6, f"{IGPO} run_igpo.sh:5,153-154"),
    Released("igpo.free_tail", 30, f"{IGPO} utils/generate.py:501-503"),
    Released("igpo.hint_prefix", "<reasoning>\n", f"{IGPO} utils/data_utils.py:97"),
    Released("igpo.hint_entropy_fraction", 0.2, f"{IGPO} run_igpo.sh:5,152"),
    Released("reward.functions.0.name", "first_boxed_correct", f"{IGPO} train_igpo.py:133-136"),
    Released("reward.functions.0.weight", 3.0, f"{IGPO} train_igpo.py:133-136"),
    Released("reward.functions.1.name", "xmlcount", f"{IGPO} train_igpo.py:133-136"),
    Released("learner.lr", 5e-7, f"{IGPO} run_igpo.sh:5,141"),
    Released("learner.warmup_steps", 50, f"{IGPO} train.yaml:30"),
    Released("learner.betas", (0.9, 0.99), f"{IGPO} train.yaml:21-23"),
    Released("learner.weight_decay", 0.1, f"{IGPO} train.yaml:21-23"),
    Released("learner.max_grad_norm", 0.2, f"{IGPO} train.yaml:24"),
    Differs("igpo.policy_loss", "ppo_clip", "gspo", f"{IGPO} run_igpo.sh:5,157",
            "the paper's per-token ratio; igpo.policy_loss=gspo gives the release's"),
    Differs("model.lora.dropout", 0.0, 0.05, f"{IGPO} train.yaml:9-11",
            "the engine samples the merged weights without dropout; the ratios assume the same function"),
    Differs("igpo.released_variant", False, True, f"{IGPO} utils/generate.py:566-594", "the paper's hint rule"),
    Differs("igpo.exclude_answer", True, False, f"{IGPO} utils/generate.py:517-534", "the paper keeps the answer out of the hints"),
    Differs("data.max_prompt_tokens", 512, "600, left-truncated", f"{IGPO} train.yaml:57", "a prompt is never cut"),
    Differs("seed", 0, 3, f"{IGPO} run_igpo.sh:145", "the random streams are not the release's either way"),
    Differs("train.steps", 200, "10 epochs", f"{IGPO} run_igpo.sh:131-132", "a fixed budget, compared at equal steps"),
]
SETTINGS["igpo_llada"] = IGPO_SETTINGS
SETTINGS["igpo_ratio0_llada"] = [e for e in IGPO_SETTINGS if e.key not in ("igpo.reveal_min", "igpo.reveal_max")] + [
    Released("igpo.reveal_min", 0.0, f"{IGPO} run_igpo.sh:6-7"),
    Released("igpo.reveal_max", 0.0, f"{IGPO} run_igpo.sh:6-7"),
]
SETTINGS["diffu_grpo_llada"] = D1_EVAL_PROTOCOL + [
    Released("model.path", "GSAI-ML/LLaDA-8B-Instruct", f"{D1} diffu-grpo/slurm_scripts/gsm_base.sbatch:21-34"),
    Released("model.lora.rank", 128, f"{D1} diffu-grpo/slurm_scripts/train.yaml:10-12"),
    Released("model.lora.alpha", 64, f"{D1} diffu-grpo/slurm_scripts/train.yaml:10-12"),
    Released("model.lora.target_modules", LLADA_TARGETS, f"{D1} diffu-grpo/diffu_grpo_train.py:92-98"),
    Released("data.train", "gsm8k", f"{D1} diffu-grpo/data_utils.py:67-76"),
    Released("data.instruction", D1_FORMAT, f"{D1} diffu-grpo/data_utils.py:26-34"),
    Released("data.prompt_template", "{instruction}\n\n{problem}", f"{D1} diffu-grpo/data_utils.py:67-76"),
    Released("seed", 42, f"{D1} diffu-grpo/slurm_scripts/train.yaml:17"),
    Released("rollout.temperature", 0.9, f"{D1} diffu-grpo/diffu_grpo_config.py:193-194"),
    Released("rollout.max_tokens", 256, f"{D1} diffu-grpo/slurm_scripts/train.yaml:60"),
    Released("rollout.diffusion.block_length", 32, f"{D1} diffu-grpo/slurm_scripts/train.yaml:62-63"),
    Released("rollout.diffusion.steps", 128, f"{D1} diffu-grpo/slurm_scripts/train.yaml:62-63"),
    Released("rollout.diffusion.remasking", "low_confidence", f"{D1} diffu-grpo/slurm_scripts/train.yaml:65"),
    Released("diffu_grpo.group_size", 6, f"{D1} diffu-grpo/slurm_scripts/train.yaml:37"),
    Released("train.prompts_per_step", 16, f"{D1} diffu-grpo/slurm_scripts/train.yaml:41-42"),
    Released("diffu_grpo.updates_per_batch", 12, f"{D1} diffu-grpo/slurm_scripts/train.yaml:70"),
    Released("diffu_grpo.prompt_mask_prob", 0.15, f"{D1} diffu-grpo/slurm_scripts/train.yaml:67"),
    Released("diffu_grpo.advantage", "group_mean", f"{D1} diffu-grpo/diffu_grpo_trainer.py:529-539"),
    Released("diffu_grpo.clip_low", 0.5, f"{D1} diffu-grpo/slurm_scripts/train.yaml:69"),
    Released("diffu_grpo.clip_high", 0.5, f"{D1} diffu-grpo/slurm_scripts/train.yaml:69"),
    Released("diffu_grpo.kl_coef", 0.04, f"{D1} diffu-grpo/slurm_scripts/train.yaml:68"),
    Released("diffu_grpo.kl_kind", "k3", f"{D1} diffu-grpo/slurm_scripts/train.yaml:68"),
    Released("diffu_grpo.policy_loss", "ppo_clip", f"{D1} diffu-grpo/diffu_grpo_trainer.py:114-118"),
    Released("diffu_grpo.loss_support", "through_eos", f"{D1} diffu-grpo/diffu_grpo_trainer.py:440-445"),
    Released("diffu_grpo.loss_agg", "group_token_mean", f"{D1} diffu-grpo/diffu_grpo_trainer.py:121"),
    *[Released(f"reward.functions.{i}.name", name, f"{D1} diffu-grpo/diffu_grpo_train.py:37-45")
      for i, name in enumerate(["d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_correctness"])],
    *[Released(f"reward.functions.{i}.weight", 1.0, f"{D1} diffu-grpo/diffu_grpo_train.py:37-45") for i in range(5)],
    Released("learner.lr", 3e-6, f"{D1} diffu-grpo/slurm_scripts/train.yaml:34"),
    Released("learner.warmup_steps", 1, f"{D1} diffu-grpo/slurm_scripts/train.yaml:32,35"),
    Released("learner.betas", (0.9, 0.99), f"{D1} diffu-grpo/slurm_scripts/train.yaml:23-25"),
    Released("learner.weight_decay", 0.1, f"{D1} diffu-grpo/slurm_scripts/train.yaml:23-25"),
    Released("learner.max_grad_norm", 0.2, f"{D1} diffu-grpo/slurm_scripts/train.yaml:26"),
    Differs("model.dtype", "bfloat16", "4-bit NF4", f"{D1} diffu-grpo/diffu_grpo_train.py:72-85",
            "the library trains unquantised weights that the engines and learner share"),
    Differs("model.lora.dropout", 0.0, 0.05, f"{D1} diffu-grpo/slurm_scripts/train.yaml:10-12",
            "the engine samples the merged weights without dropout; the ratios assume the same function"),
    Differs("data.max_prompt_tokens", 200, "200, left-truncated", f"{D1} diffu-grpo/slurm_scripts/train.yaml:61",
            "a prompt is never cut"),
    Differs("train.steps", 200, "10 epochs, stopped by hand", f"{D1} diffu-grpo/slurm_scripts/train.yaml:38",
            "a fixed budget, compared at equal steps"),
]
