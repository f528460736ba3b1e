"""Config errors a person can act on."""
from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what is allowed."""


def error_parts(err: ValidationError, prefix: str = "") -> list[str]:
    parts = []
    for e in err.errors():
        if not e["loc"]:  # a whole-config check (a model validator): its message says it all
            parts.append(e["msg"].removeprefix("Value error, "))
            continue
        loc = prefix + ".".join(str(x) for x in e["loc"])
        parts.append(f"`{loc}`: {e['msg']} (got {e.get('input')!r})")
    return parts
