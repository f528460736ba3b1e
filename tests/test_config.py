"""Recipes, overrides and the errors a person sees when they get one wrong."""
import subprocess
import sys

import pytest

from rl.config import PROJECT_ROOT, RECIPES_DIR, ConfigError, load_config


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
