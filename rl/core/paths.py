"""Where the project's files are: the checkout (or installed package) root, the recipes, and what
relative data paths are taken from."""
from __future__ import annotations

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A checkout has pyproject.toml and recipes/ beside the packages; an installed package (pip install)
# sits in site-packages, with the recipes under <prefix>/share/rl-reason/recipes (pyproject's data-files).
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "recipes").is_dir()


def _recipes_dir() -> Path:
    """The checkout's recipes/, else the copy installed with the package (wherever pip's scheme put
    it: a venv, the system, --user), else the checkout path, which error messages then name."""
    if IN_CHECKOUT:
        return PROJECT_ROOT / "recipes"
    import site
    import sysconfig
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("rl-reason")
        for file in dist.files or []:
            if file.as_posix().endswith(".yaml") and "share/rl-reason/recipes/" in file.as_posix():
                return Path(dist.locate_file(file)).resolve().parent
    except PackageNotFoundError:
        pass
    for base in (sysconfig.get_path("data"), sys.prefix, site.USER_BASE):
        candidate = Path(base or "") / "share" / "rl-reason" / "recipes"
        if candidate.is_dir():
            return candidate
    return PROJECT_ROOT / "recipes"


RECIPES_DIR = _recipes_dir()


def relative_root() -> Path:
    """What relative data paths (data.train, data.local_dir) are taken from: the checkout's root, as
    the recipes assume (../shared/data), or, for an installed package, the current directory."""
    return PROJECT_ROOT if IN_CHECKOUT else Path.cwd()
