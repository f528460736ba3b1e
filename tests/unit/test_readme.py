"""The README's code examples are the test fixtures that train, verbatim (after their docstring)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _body(path: Path) -> str:
    src = path.read_text()
    docstring = ast.parse(src).body[0]
    return "\n".join(src.splitlines()[docstring.end_lineno:]).strip("\n")


def _python_block_after(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


@pytest.mark.parametrize("heading, fixture", [
    ("## Write your own algorithm", "reinforce_rloo.py"),
    ("## Write your own engine", "plain_sampler_engine.py"),
])
def test_readme_example_is_the_fixture_verbatim(heading, fixture):
    assert _python_block_after(heading) == _body(ROOT / "tests" / "fixtures" / fixture)
