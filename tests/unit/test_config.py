"""Recipes, overrides and the errors a person sees when they get one wrong."""
import subprocess
import sys

import pytest

from rl.config import ConfigError, RunConfig, load_config
from rl.core.paths import PROJECT_ROOT, RECIPES_DIR


def test_every_recipe_validates():
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(path.stem)
        assert cfg.recipe == path.stem


def test_dotted_overrides_are_typed_and_applied():
    cfg = load_config("grpo_smollm2", ["train.steps=3", "grpo.kl_coef=0.01", "learner.betas=[0.9, 0.95]",
                                       "data.max_rows=null"])
    assert cfg.train.steps == 3 and cfg.grpo.kl_coef == 0.01 and cfg.learner.betas == (0.9, 0.95)
    assert cfg.data.max_rows is None


def test_an_override_that_is_not_yaml_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"Override `opsd.teacher_template=\{solution\} \{problem\}`: its value is not "
                                          r"valid YAML .* quote it in YAML \(`opsd.teacher_template='\{solution\} \{problem\}'`"):
        load_config("opsd_smollm2", ["opsd.teacher_template={solution} {problem}"])
    cfg = load_config("opsd_smollm2", ["opsd.teacher_template='{solution} {problem}'"])
    assert cfg.opsd.teacher_template == "{solution} {problem}"


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError, match="grpo.kl_coeff") as e:
        load_config("grpo_smollm2", ["grpo.kl_coeff=0.1"])
    msg = str(e.value)
    assert "grpo.kl_coeff" in msg and "Did you mean `grpo.kl_coef`" in msg and "grpo.loss_agg" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="grpo.loss_agg") as e:
        load_config("grpo_smollm2", ["grpo.loss_agg=mean"])
    msg = str(e.value)
    assert "grpo.loss_agg" in msg and "token_mean" in msg and "seq_mean_token_mean" in msg


def test_bad_type_and_missing_recipe():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("grpo_smollm2", ["train.steps=many"])
    with pytest.raises(ConfigError, match="Available recipes: .*grpo_smollm2"):
        load_config("no_such_recipe")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("grpo_smollm2", ["train.steps"])


def test_engine_and_model_kind_must_fit_and_benchmarks_are_known():
    with pytest.raises(ConfigError, match="rollout.engine=diffusion"):
        load_config("grpo_smollm2", ["model.kind=masked_diffusion"])
    with pytest.raises(ConfigError, match="top_p=1"):
        load_config("igpo_tiny", ["rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="unknown benchmarks.*synthetic"):
        load_config("grpo_smollm2", ["eval.benchmarks=[gsm9k]"])
    assert load_config("igpo_tiny", ["eval.benchmarks=[synthetic:chain_addition]"]).eval.benchmarks == ["synthetic:chain_addition"]


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "rl.launch", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_launch_misspelled_key_is_one_paragraph():
    proc = _launch("recipe=grpo_smollm2", "trian.steps=3")
    assert proc.returncode == 2
    assert "Unknown config key `trian`" in proc.stderr and "Did you mean `train`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_missing_model_path_is_one_paragraph(tmp_path):
    proc = _launch("recipe=grpo_smollm2", f"model.path={tmp_path}/nope", f"tracking.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "model.path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_print_config_dry_run():
    proc = _launch("recipe=grpo_smollm2", "train.steps=2", "--print-config", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 2" in proc.stdout and "config OK" in proc.stderr


def _printed_config(module: str, recipe: str) -> dict:
    import yaml

    proc = subprocess.run([sys.executable, "-m", module, f"recipe={recipe}", "--print-config"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_grpo_qwen_resolves_to_the_opsd_papers_grpo_baseline():
    # siyan-zhao/OPSD scripts/run_grpo.sh: --temperature 1.2, --loss_type grpo, --scale_rewards group,
    # TRL's epsilon 0.2, 8 processes x 1 x 4 accumulation = 32 completions = 4 prompts x 8, num_iterations 2.
    cfg = load_config("grpo_qwen").model_dump(mode="json")  # what --print-config prints
    assert cfg["rollout"]["temperature"] == 1.2
    assert cfg["grpo"]["loss_agg"] == "seq_mean_token_mean"
    assert cfg["grpo"]["advantage"] == "group_mean_std"
    assert (cfg["grpo"]["clip_low"], cfg["grpo"]["clip_high"]) == (0.2, 0.2)
    assert (cfg["train"]["prompts_per_step"], cfg["grpo"]["group_size"]) == (4, 8)
    assert cfg["grpo"]["updates_per_batch"] == 2
    assert cfg["grpo"]["kl_coef"] == 0.0
    assert cfg["model"]["lora"]["rank"] == 64 and cfg["model"]["lora"]["alpha"] == 128.0


def test_sft_qwen_resolves_to_the_opsd_papers_sft_baseline():
    cfg = _printed_config("rl.sft", "sft_qwen")
    assert cfg["model"]["lora"]["enabled"] is True
    assert (cfg["model"]["lora"]["rank"], cfg["model"]["lora"]["alpha"]) == (64, 128.0)
    assert cfg["learner"]["lr"] == 5e-6
    assert (cfg["train"]["prompts_per_step"], cfg["train"]["steps"]) == (64, 100)  # run_sft.sh's 8 x 2 x 4
    assert cfg["data"]["train"] == load_config("opsd_qwen").data.train  # the same problems
    assert cfg["sft"]["completion_only_loss"] is False  # sft_train.py trains every token of its `text`


def test_opsd_qwen_uses_the_released_temperature_scaling_and_ema_decay_default():
    cfg = load_config("opsd_qwen")
    assert cfg.opsd.scale_logits_by_temperature is True and cfg.rollout.temperature == 1.1
    assert cfg.opsd.teacher.ema_decay == 0.999  # run_opsd_ema.sh --ema_decay 0.999


def test_an_eval_length_the_diffusion_sampler_cannot_run_stops_the_launch():
    with pytest.raises(ConfigError, match="eval.max_tokens=20 does not fit the diffusion sampler"):
        load_config("igpo_tiny", ["eval.every_steps=5", "eval.max_tokens=20"])
    assert load_config("igpo_tiny", ["eval.every_steps=5"]).eval.max_tokens == 24


# ---- the algorithm's section: a union keyed on `algorithm` ---------------------------------------


def test_a_recipe_carries_only_its_algorithms_section():
    cfg = load_config("igpo_tiny")
    assert cfg.igpo.chunk_min == 2 and cfg.algorithm_section is cfg.igpo
    for other in ("grpo", "opsd", "diffu_grpo"):
        assert not hasattr(cfg, other)
    assert "opsd:" not in cfg.to_yaml() and "grpo:" not in load_config("opsd_smollm2").to_yaml()


def test_another_algorithms_section_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"Section `opsd` configures algorithm opsd, but this run's algorithm is grpo: "
                                          r"its options go in section `grpo`"):
        load_config("grpo_smollm2", ["opsd.clip=0.1"])
    # Switching the algorithm of a recipe that carries another algorithm's section.
    with pytest.raises(ConfigError, match=r"Section `igpo` configures algorithm igpo, but this run.s algorithm is diffu_grpo: its options go in section `diffu_grpo`"):
        load_config("igpo_tiny", ["algorithm=diffu_grpo"])
    with pytest.raises(ValueError, match="Section `grpo` configures algorithm grpo"):
        RunConfig(algorithm="opsd", grpo={"group_size": 4})


def test_an_unknown_option_of_the_algorithms_section_is_named():
    with pytest.raises(ConfigError, match=r"Unknown config key `igpo.chunk_mid`. Did you mean `igpo.chunk_min`"):
        load_config("igpo_tiny", ["igpo.chunk_mid=3"])
    with pytest.raises(ConfigError, match=r"`diffu_grpo.prompt_mask_prob`: Input should be less than 1"):
        load_config("diffu_grpo_tiny", ["diffu_grpo.prompt_mask_prob=1.5"])
    # HintSettings' cross-field rule holds in the section that inherits it.
    with pytest.raises(ConfigError, match=r"chunk_max \(3\) must be >= chunk_min \(4\)"):
        load_config("igpo_tiny", ["igpo.chunk_min=4", "igpo.chunk_max=3"])
    with pytest.raises(ConfigError, match="Unknown algorithm 'gpro'"):
        load_config(None, ["algorithm=gpro"])


def test_options_that_moved_into_the_algorithms_section_are_errors_where_they_were():
    with pytest.raises(ConfigError, match=r"Unknown config key `learner.teacher`"):
        load_config("opsd_smollm2", ["learner.teacher.kind=ema"])
    assert load_config("opsd_smollm2", ["opsd.teacher.kind=ema"]).opsd.teacher.kind == "ema"
    with pytest.raises(ConfigError, match=r"Unknown config key `learner.prompt_mask_prob`"):
        load_config("diffu_grpo_tiny", ["learner.prompt_mask_prob=0.15"])
    with pytest.raises(ConfigError, match=r"Unknown advantage estimator 'mean'; registered: group_mean, group_mean_std, .*rloo"):
        load_config(None, ["grpo.advantage=mean"])
    with pytest.raises(ConfigError, match=r"Unknown policy loss 'gpso'; registered: gspo, .*ppo_clip"):
        load_config(None, ["grpo.policy_loss=gpso"])
