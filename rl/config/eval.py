"""The `eval` section: benchmark evaluation's own protocol, and the named protocols of the papers."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from rl.config.prompts import PromptSpec
from rewards.math import AnswerFallback

BENCHMARKS = ("gsm8k", "math500", "amc23", "aime24", "aime25", "hmmt25")

# Named evaluation protocols: what a comparison's every run is evaluated with, whatever its training
# recipe. A recipe names one (`eval.protocol`); keys it also sets explicitly override the protocol's
# values (and then the run's recorded protocol differs, which rl.compare reports).
EVAL_PROTOCOLS: dict[str, dict[str, Any]] = {
    # The OPSD paper's evaluation of every method (base, SFT, GRPO, OPSD; arXiv 2601.18734 v3 Table 8
    # and siyan-zhao/OPSD eval/evaluate_math.py + eval/run_eval.sh at 7448751): the Qwen3 chat template
    # with thinking on (:577-581), "{problem}\n\nPlease reason step by step, ..." (:340-342), T 1.0,
    # top-p 0.95 in thinking mode (:592-597, 653-654), no top-k (-1, :598-600), 38,912 new tokens
    # (:571-576; 40,960 context), avg@12 (run_eval.sh:10,20), graded on the last \boxed{} of the whole
    # output with no fallback (:15-86).
    "opsd_paper": dict(
        prompt_format="chat", enable_thinking=True, max_tokens=38912, temperature=1.0, top_p=0.95, top_k=-1, k=12,
        max_prompt_tokens=2048, grader="last_boxed_correct",
    ),
    # d1's evaluation, which IGPO reports with (dllm-reasoning/d1 eval/eval.py, eval/gsm8k.py): its
    # format prompt + "\n\n" + question as the user message, greedy (T 0), one sample, 256-token
    # answers in the training blocks and steps (rollout.diffusion). (d1's MATH500 prompt differs
    # only in whitespace; one template serves every benchmark here.)
    "d1_paper": dict(
        prompt_format="chat", max_tokens=256, temperature=0.0, top_p=1.0, top_k=-1, k=1,
        prompt_template=(
            "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the "
            "final answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning "
            "here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>\n\n{problem}"
        ),
        # d1 prefills "<reasoning>" after the generation prompt for every model (eval/gsm8k.py:62-66,
        # eval/eval.py:189, 215-220) and grades GSM8K by its own rule (eval/parse_and_get_acc.py:43-75).
        # MATH500 keeps math_verify: d1's last box + string equivalence is not implemented here.
        assistant_prefix="<reasoning>", grader={"gsm8k": "d1_gsm8k"},
    ),
}
# The settings that make up a protocol: two runs whose values differ were not evaluated alike.
PROTOCOL_KEYS = (
    "prompt_format", "prompt_template", "system_prompt", "enable_thinking", "max_tokens", "temperature",
    "top_p", "top_k", "k", "answer_fallback", "limit", "assistant_prefix", "grader",
)


class EvalConfig(PromptSpec):
    """Benchmark evaluation: `python -m rl.evaluate`, and periodic evaluation during training.

    The evaluation protocol (prompt, thinking switch, length, sampling, k) is declared here, never
    taken from the training recipe's `data` or `rollout` sections: recipes that are compared must be
    evaluated alike, and their training prompts or rollout lengths differ by design (OPSD's student
    runs with thinking off and 1024 tokens, GRPO with thinking on and 16k)."""

    protocol: Optional[str] = Field(
        None,
        description="A named protocol from rl.config.EVAL_PROTOCOLS (`opsd_paper`: the OPSD paper's "
        "evaluation of every method, thinking on, 38,912 tokens, T 1.0, avg@12; `d1_paper`: greedy, "
        "256 tokens) that fills every protocol key the recipe does not set. None: the defaults below.",
    )

    every_steps: int = Field(
        0,
        ge=0,
        description="During training, evaluate the current weights after every N-th step's weight sync "
        "and after the last step, so that each curve ends at the final model. 0 turns periodic "
        "evaluation off.",
    )
    at_start: bool = Field(
        False,
        description="Also evaluate the initial model before the first step (logged as step 0 with 0 "
        "rollout tokens): the common starting point of every method's curve.",
    )
    benchmarks: list[str] = Field(
        default_factory=lambda: ["gsm8k"],
        min_length=1,
        description="Sets to evaluate on, by short name: from the hub (openai/gsm8k test, "
        "HuggingFaceH4/MATH-500, math-ai/amc23, HuggingFaceH4/aime_2024, yentinglin/aime_2025, "
        "MathArena/hmmt_feb_2025 (HMMT February 2025)), or from `local_dir` when set; "
        "or `<source>:<name>` from a data source a plug-in registered (e.g. synthetic:chain_addition, "
        "the test split of rl.demo.tiny's offline tasks, with plugins=[rl.demo.tiny]).",
    )
    local_dir: Optional[str] = Field(
        None,
        description="Folder holding `<name>/test.jsonl` for each benchmark (such as ../shared/data); "
        "relative paths are taken from the project root. None reads from the hub.",
    )
    limit: Optional[int] = Field(
        None,
        ge=1,
        description="Evaluate only the first N problems of each benchmark, in file order: a fixed "
        "subset, the same at every evaluation, so points of a curve are comparable. None: all.",
    )
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        description="chat: the tokenizer's chat template around `prompt_template`; plain: the problem "
        "text as-is (synthetic tasks, base models). Independent of data.prompt_format.",
    )
    prompt_template: str = Field(
        "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        description="The user message in chat format; `{problem}` is replaced by the problem text. The "
        "default is the OPSD evaluation's (and Qwen's recommended) math prompt.",
    )
    max_prompt_tokens: int = Field(
        1024,
        ge=1,
        description="Longest evaluation prompt accepted: a longer one stops the run before any work, since "
        "the engines' context is sized from the longest prompt plus max_tokens.",
    )
    k: int = Field(
        1,
        ge=1,
        description="Samples per problem. 1 with the default temperature is greedy accuracy; k > 1 "
        "gives avg@k and unbiased pass@j for j = 1, 2, 4, ... up to k.",
    )
    temperature: Optional[float] = Field(
        None,
        ge=0,
        description="Sampling temperature. None: 0 (greedy) when k = 1, else 0.6 (the DeepSeek-R1 / "
        "Qwen3 evaluation setting). k > 1 needs a temperature above 0.",
    )
    top_p: float = Field(
        0.95, gt=0, le=1, description="Nucleus cut when sampling [0.95, with temperature 0.6]; greedy ignores it."
    )
    top_k: int = Field(-1, description="Top-k cut when sampling; -1 disables it (the OPSD evaluation's setting).")
    max_tokens: int = Field(
        1024,
        ge=1,
        description="Maximum completion length. Its own setting, not rollout.max_tokens: evaluating each "
        "recipe at its training length would make curves of different recipes incomparable. The "
        "engines' context is sized for the longer of training and evaluation. For the diffusion "
        "engine this is the answer length, a multiple of rollout.diffusion.block_length.",
    )
    answer_fallback: AnswerFallback = Field(
        "last_number",
        description="How grading finds an answer without \\boxed{} or `#### N`, as reward.answer_fallback "
        "(default the same as the training reward, so evaluation measures what training rewards).",
    )
    grader: Union[str, dict[str, str]] = Field(
        "math_verify",
        description="The correctness reward that grades evaluation completions (full marks = right): "
        "math_verify (the last \\boxed{}, else `#### N`, else answer_fallback; math-verify equivalence), "
        "d1_gsm8k (d1's GSM8K rule: the first parseable box, else the first <answer> tag, float "
        "equality), or any reward registered with correctness=True or named `module:function`. A "
        "mapping {benchmark: grader} grades those benchmarks so and the others with math_verify. "
        "Saved with each record, so regrade uses it.",
    )
    batch_size: int = Field(
        64, ge=1, description="Problems per generate call; progress is reported and records written after each."
    )
    save_records: bool = Field(
        True,
        description="Write each evaluation's per-problem records (completions, per-sample correctness) "
        "as <benchmark>.jsonl next to its summary.json (during training: <run>/eval/step_N/). About "
        "4 bytes a generated token: turn off for long completions on large sets.",
    )

    def grader_for(self, benchmark: str) -> str:
        """The grader of one benchmark's completions."""
        return self.grader if isinstance(self.grader, str) else self.grader.get(benchmark, "math_verify")

    @field_validator("grader")
    @classmethod
    def _correctness_graders(cls, grader):
        for name in [grader] if isinstance(grader, str) else grader.values():
            cls._correctness_grader(name)
        return grader

    @staticmethod
    def _correctness_grader(name: str) -> str:
        from rewards.registry import get_reward, is_correctness_reward, registered_rewards

        try:
            fn = get_reward(name)
        except (KeyError, ImportError, AttributeError) as e:
            raise ValueError(str(e.args[0] if e.args else e)) from None
        if ":" not in name and not is_correctness_reward(fn):
            graders = [r for r in registered_rewards() if is_correctness_reward(get_reward(r))]
            raise ValueError(f"eval.grader {name!r} is not a correctness reward; choose one of {', '.join(graders)}.")
        return name

    @model_validator(mode="before")
    @classmethod
    def _fill_from_protocol(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") is not None:
            name = data["protocol"]
            if name not in EVAL_PROTOCOLS:
                raise ValueError(f"unknown eval.protocol {name!r}; choose from {', '.join(EVAL_PROTOCOLS)} or null")
            data = {**EVAL_PROTOCOLS[name], **data}
        return data

    def resolved_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.k == 1 else 0.6

    def protocol_settings(self) -> dict[str, Any]:
        """What this evaluation's numbers depend on besides the model: recorded with every run and
        compared by rl.compare (temperature resolved, so None and its value compare equal)."""
        out = {key: getattr(self, key) for key in PROTOCOL_KEYS}
        out["temperature"] = self.resolved_temperature()
        return out

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        # `<source>:<name>` is checked when it is read (rl.data.source_loader): its source may
        # be registered by a plug-in.
        unknown = [n for n in names if n not in BENCHMARKS and ":" not in n]
        if unknown:
            raise ValueError(
                f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)} or <source>:<name> from a "
                "registered data source (e.g. synthetic:chain_addition)"
            )
        return names

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> "EvalConfig":
        if self.k > 1 and self.temperature == 0:
            raise ValueError(f"eval.k={self.k} samples at temperature 0 would all be identical; set eval.temperature > 0 or eval.k=1")
        return self
