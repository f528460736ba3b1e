"""Loading: recipe file + dotted overrides -> validated RunConfig, with errors a person can act on.
The config's `plugins` are imported first, so that anything they register can be named."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from rl.config.algorithm import algorithm_section, engine_section, stray_key_message
from rl.config.errors import ConfigError, error_parts
from rl.config.run import RolloutConfig, RunConfig
from rl.core.paths import RECIPES_DIR
from rl.core.plugins import absolute_ref, import_plugins


def _check_keys(data: dict, model_cls: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the allowed choices and a close match, before pydantic runs."""
    fields = {name: f.annotation for name, f in model_cls.model_fields.items()}
    if model_cls is RunConfig:
        ref = data.get("algorithm", RunConfig.model_fields["algorithm"].default)
        try:
            section, config_cls = algorithm_section(ref)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if section is not None:
            fields[section] = config_cls
    if model_cls is RolloutConfig:  # the engine's own section, `rollout.<name>`
        try:
            engine, engine_cls = engine_section(data.get("engine", RolloutConfig.model_fields["engine"].default))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if engine is not None:
            fields.setdefault(engine, engine_cls)
    for key, value in data.items():
        if key not in fields and model_cls is RunConfig:
            raise ConfigError(stray_key_message(key, ref, section, RunConfig))
        if key not in fields:
            allowed = list(fields)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{prefix}{key}`.{hint} Allowed keys here: "
                f"{', '.join(prefix + k for k in allowed)}."
            )
        sub = fields[key]
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            _check_keys(value, sub, prefix=f"{prefix}{key}.")


def _format_validation_error(err: ValidationError) -> str:
    return "Invalid config value: " + "; ".join(error_parts(err)) + ". Fix the recipe or the override."


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    available = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(
        f"Recipe `{name_or_path}` not found: no file {candidate}. Available recipes: "
        f"{', '.join(available)}; or pass a path to a .yaml file."
    )


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"Override `{dotted}`: `{k}` is a value, not a section.")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    data: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override `{item}` is not of the form key=value (e.g. train.steps=10).")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override `{item}` has an empty key.")
        _set_dotted(data, key, _override_value(item, raw))
    return data


def _override_value(item: str, raw: str):
    """An override's value read as YAML (numbers, booleans, lists, mappings), refused in one line when
    it is not YAML: most often a string that starts with `{` or `[`, which YAML reads as a mapping or list."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"Override `{item}`: its value is not valid YAML ({getattr(e, 'problem', None) or e}). A value starting "
            "with `{` or `[` is read as a mapping or a list: for a string, quote it in YAML "
            f"(`{item.split('=', 1)[0]}='{raw}'`, and on a shell command line wrap that in double quotes)."
        ) from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    data: dict = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Recipe {path} must be a mapping of sections, got {type(data).__name__}.")
        data.setdefault("recipe", path.stem)
    data = _merge(data, parse_overrides(overrides or []))
    plugins = data.get("plugins") or []
    if isinstance(plugins, list):  # first: a plug-in may register what the rest of the config names
        # Files saved absolute, so that actors and a resume from anywhere import the same ones.
        plugins = data["plugins"] = [str(Path(p).resolve()) if str(p).endswith(".py") else str(p) for p in plugins]
        try:
            import_plugins(plugins)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    rollout = data.get("rollout")
    if isinstance(rollout, dict) and isinstance(rollout.get("engine"), str):
        data["rollout"] = {**rollout, "engine": absolute_ref(rollout["engine"])}
    _check_keys(data, RunConfig)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
