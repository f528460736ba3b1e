"""The base of every typed config section, the library's and a plug-in's alike."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated like loading."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
