"""Data sources and model builders are registries filled by plug-ins (the config's `plugins`);
the demo module rl.demo.tiny is one such plug-in and nothing in the library imports it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl import data, models
from rl.config import ConfigError, DataConfig, load_config
from rl.data import DataError, check_local_paths, load_rows, register_data_source
from rl.models import ModelError, check_model_path, register_model_builder, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def empty_registries(monkeypatch, tmp_path):
    """Registries with nothing registered and a model cache of this test's own."""
    monkeypatch.setattr(data, "DATA_SOURCES", {})
    monkeypatch.setattr(models, "MODEL_BUILDERS", {})
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")


def test_a_registered_data_source_is_selected_by_its_prefix(empty_registries):
    calls = []

    def squares(name, split):
        calls.append((name, split))
        return [{"question": f"{n}*{n}=", "answer": str(n * n)} for n in range(int(name))]

    register_data_source("squares", squares)
    rows = load_rows(DataConfig(train="squares:3", split="test", shuffle=False), seed=0)
    assert calls == [("3", "test")]
    assert [(r["problem"], r["answer"]) for r in rows] == [("0*0=", "0"), ("1*1=", "1"), ("2*2=", "4")]
    assert check_local_paths(DataConfig(train="squares:3")) == []


def test_an_unknown_data_source_is_a_clear_error(empty_registries):
    with pytest.raises(DataError, match=r"no data source 'synthetic' is registered \(registered: none\).*plugins=\[rl.demo.tiny\]"):
        load_rows(DataConfig(train="synthetic:chain_addition"), seed=0)
    # The dry run (rl.launch --dry-run) finds it too, without reading anything.
    with pytest.raises(DataError, match="no data source 'synthetic'"):
        check_local_paths(DataConfig(train="synthetic:chain_addition"))


def test_a_prefix_cannot_be_taken_twice(empty_registries):
    register_data_source("mine", lambda name, split: [])
    with pytest.raises(ValueError, match="'mine' is already registered"):
        register_data_source("mine", lambda name, split: [])
    with pytest.raises(ValueError, match="one word"):
        register_data_source("two words", lambda name, split: [])


def test_a_registered_model_builder_builds_once_into_the_cache(empty_registries):
    built = []

    def builder(out_dir):
        built.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))

    register_model_builder("my-tiny", builder, version=3)
    check_model_path("my-tiny")  # known without building anything
    assert built == []
    first = resolve_model_path("my-tiny")
    assert resolve_model_path("my-tiny") == first and len(built) == 1  # cached: not rebuilt
    assert Path(first).name == "my-tiny-v3" and json.loads((Path(first) / "config.json").read_text())["model_type"] == "bert"
    with pytest.raises(ValueError, match="'my-tiny' is already registered"):
        register_model_builder("my-tiny", lambda out_dir: None)


def test_an_unknown_model_name_is_a_clear_error(empty_registries):
    with pytest.raises(ModelError, match=r"registered: none.*register_model_builder.*plugins=\[rl.demo.tiny\]"):
        check_model_path("tiny-dllm-chain-addition")
    with pytest.raises(ModelError, match="tiny-dllm-chain-addition"):
        resolve_model_path("tiny-dllm-chain-addition")


def test_a_plugin_file_named_in_the_config_registers_its_names(empty_registries):
    cfg = load_config(None, [f"plugins=[{ROOT}/tests/fixtures/custom_plugin.py]", "data.train=countdown:3", "data.shuffle=false"])
    assert [r["answer"] for r in load_rows(cfg.data, seed=0)] == ["2", "1", "0"]


def test_a_plugin_that_does_not_import_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"`plugins`.*could not import plug-in 'rl.demo.no_such'.*ModuleNotFoundError"):
        load_config(None, ["plugins=[rl.demo.no_such]"])
    with pytest.raises(ConfigError, match=r"could not import plug-in '[^']*nowhere.py'.*does not exist"):
        load_config(None, ["plugins=[nowhere.py]"])


def test_the_library_does_not_import_the_demo_module_and_the_recipe_does():
    # A fresh interpreter: this test session may have imported rl.demo.tiny already.
    entry_points = "rl.launch, rl.evaluate, rl.sft, rl.compare, rl.plot, rl.data, rl.models, rl.loop.trainer, rl.config"
    code = (
        f"import sys, {entry_points}\n"
        "print(sorted(m for m in sys.modules if m.startswith('rl.demo')))\n"
        "cfg = rl.config.load_config('igpo_tiny')\n"  # names plugins: [rl.demo.tiny]
        "print(sorted(rl.data.DATA_SOURCES), sorted(rl.models.MODEL_BUILDERS))\n"
        "rl.models.check_model_path(cfg.model.path)\n"
        "print(len(rl.data.load_rows(cfg.data, seed=0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "['synthetic'] ['tiny-dllm-chain-addition', 'tiny-dllm-chain-addition-reader', 'tiny-llada-chain-addition', 'tiny-qwen3-addition', 'tiny-qwen3-addition-sft']", "5000"]
