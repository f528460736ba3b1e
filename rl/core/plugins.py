"""The one loader of user code: plug-in modules, `path/to/file.py:Name` and `module.path:Name`.

Every entry point (launch, evaluate, sft, compare's config reading, scripts) and every actor
(learner ranks, rollout engines, reward workers) loads user code through here, so a name a
plug-in registers means the same thing in every process:

- A file is imported once per process under a name derived from its absolute path, and its module
  is pickled by value (cloudpickle): a function or class defined in it (a loss, an algorithm, an
  engine) travels to an actor that could not import the file by name.
- `import_plugins(names)` imports the config's `plugins` and is what an actor calls when it starts,
  before it unpickles anything that refers to them.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path


def load_file(path: Path):
    """Import a Python file as a module, once per process; its objects pickle by value."""
    path = Path(path).resolve()
    module_name = f"_user_{path.stem}_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    _pickle_by_value(module)
    return module


def _pickle_by_value(module) -> None:
    try:
        import ray.cloudpickle
    except ImportError:  # no Ray: nothing is shipped to other processes
        return
    ray.cloudpickle.register_pickle_by_value(module)


def load_object(ref: str, what: str, noun: str = "function"):
    """The object `module.path:name` or `path/to/file.py:name` names (`what` and `noun`, what it
    should be, name it in errors: "reward", "algorithm" / "class", ...)."""
    target, name = ref.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise FileNotFoundError(f"{what} file {path.resolve()} does not exist")
            module = load_file(path)
        else:
            module = importlib.import_module(target)
    except Exception as e:  # import errors of user code: say which plug-in failed to load
        raise ImportError(f"Could not load {what} {ref!r}: {type(e).__name__}: {e}") from e
    obj = getattr(module, name, None)
    if obj is None:
        raise AttributeError(f"{what.capitalize()} {ref!r}: {target} has no {noun} {name!r}.")
    return obj


def absolute_ref(ref: str) -> str:
    """`file.py:name` with the file's absolute path (other references unchanged), so that it
    resolves from any working directory: a resume, an actor."""
    target, _, name = ref.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else ref


def defining_ref(obj) -> str:
    """The `module:name` or absolute `file.py:name` reference of a function or class that a fresh
    process can load."""
    module = obj.__module__
    if module == "__main__" or module.startswith("_user_"):
        return f"{Path(inspect.getfile(obj)).resolve()}:{obj.__name__}"
    return f"{module}:{obj.__name__}"


def import_plugins(plugins: list[str]) -> None:
    """Import the config's `plugins` (module names or .py files), naming the one that fails
    (ValueError)."""
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                if not Path(plugin).is_file():
                    raise FileNotFoundError(f"{Path(plugin).resolve()} does not exist")
                load_file(Path(plugin))
            else:
                importlib.import_module(plugin)
        except Exception as e:  # an error of the user's plug-in: name it, then what went wrong
            raise ValueError(
                f"`plugins`: could not import plug-in {plugin!r}: {type(e).__name__}: {e}. A plug-in is a module "
                "name (rl.demo.tiny) or a path to a .py file"
            ) from None
