"""How a problem becomes a prompt: the one spec that training data (`data`) and evaluation (`eval`)
share, each with its own values (rl.data.prompt_ids builds both)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from rl.core.schema import Section


class PromptSpec(Section):
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        description="chat: the tokenizer's chat template around `prompt_template`; plain: the problem "
        "text as-is (synthetic tasks, base models).",
    )
    prompt_template: str = Field(
        "{problem}",
        description="The user message in chat format; `{problem}` is replaced by the problem text.",
    )
    system_prompt: Optional[str] = Field(None, description="Optional system message (chat format).")
    enable_thinking: Optional[bool] = Field(
        None,
        description="Passed to chat templates that have a thinking switch (Qwen3's `enable_thinking`); "
        "None leaves the template's default (on, for Qwen3).",
    )
    assistant_prefix: str = Field(
        "",
        description="Text put after the chat template's generation prompt, as the start of the answer "
        "(d1's evaluation prefills `<reasoning>`). It is part of the prompt: the engine continues it, "
        "and the completion is what the engine generated after it.",
    )
