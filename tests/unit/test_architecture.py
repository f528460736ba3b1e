"""The library's shape holds: layers import only downwards (rl/core/layers.py), no import cycle
(imports inside functions included), no private name imported from another module, and every
function reads in one sitting. Measured from the source by scripts/architecture.py."""
import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
architecture = importlib.util.module_from_spec(spec)
sys.modules["architecture"] = architecture
spec.loader.exec_module(architecture)

MAX_FUNCTION_LINES = 80


def test_no_import_cycle():
    assert architecture.cycles(architecture.graph(architecture.modules())) == []


def test_no_private_name_imported_across_modules():
    assert architecture.private_imports(architecture.modules()) == []


def test_every_import_follows_the_layering():
    assert architecture.layer_breaks(architecture.modules()) == []


def test_every_function_is_shorter_than_80_lines():
    longest = architecture.longest(architecture.modules(), ast.FunctionDef, n=1)
    assert longest[0][0] < MAX_FUNCTION_LINES, longest


def test_the_analysis_sees_what_it_checks(tmp_path, monkeypatch):
    """A cycle through an import inside a function, a private import and an upward import are found."""
    for package in ("rl", "rollouts", "rewards"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "rl" / "core").mkdir()
    (tmp_path / "rl" / "core" / "__init__.py").write_text("")
    (tmp_path / "rl" / "core" / "a.py").write_text("def f():\n    from rl.core.b import g\n")
    (tmp_path / "rl" / "core" / "b.py").write_text("from rl.core.a import f\nfrom rollouts.x import _hidden\n")
    (tmp_path / "rollouts" / "x.py").write_text("_hidden = 1\n")
    monkeypatch.setattr(architecture, "ROOT", tmp_path)
    mods = architecture.modules()
    assert architecture.cycles(architecture.graph(mods)) == [["rl.core.a", "rl.core.b"]]
    assert architecture.private_imports(mods) == ["rl/core/b.py:2 imports rollouts.x._hidden"]
    assert architecture.layer_breaks(mods) == ["rl/core/b.py:2 (core) imports rollouts.x (rollouts)"]
