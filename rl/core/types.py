"""The hand-off between the rollout side and the training side: plain dataclasses, no framework."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. Engines translate this into their own parameters."""

    n: int = 1  # completions per prompt (GRPO's group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    # Masked-diffusion engines: keep every answer position (token ids, log-probs, hint mask) after
    # the first EOS too, the EOS padding included, so the loss covers the whole answer (the IGPO
    # release's support); the text is still decoded through the first EOS. Causal engines stop at EOS.
    keep_after_eos: bool = False


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    # Log-probability of each sampled token under the engine's sampling distribution
    # (temperature applied), one per entry of token_ids.
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_tokens)
    # Masked-diffusion inpainting: True at tokens that were fixed hints, not sampled (None: no hints).
    hint_mask: list[bool] | None = None
    # Masked-diffusion engines: the model calls per block the sampler took for the batch this
    # completion was sampled in (varies with parallel decoding); None for other engines.
    sampler_calls: float | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class ScoringRequest:
    """Ask an engine for the log-probability of given completion tokens after a prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TopK:
    """An engine's top-k scoring of one request's tokens (`score_top_k`): per token position, the k most
    likely ids (most likely first), their log-probs, and the log-prob of the request's own token."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    token_logprobs: list[float]


@dataclass(frozen=True)
class EngineSettings:
    """What a rollout engine is built with besides its model path and seed: the run's common
    settings (rl.config's RolloutConfig.engine_settings, the one place the trainer's engines and
    rl.evaluate's get them) and `options`, the values of the engine's own section."""

    dtype: str = "float32"
    max_model_len: int = 2048
    trust_remote_code: bool = False
    kv_cache_gb: float = 1.0  # KV cache on CPU
    gpu_memory_utilization: float | None = None  # the engine's share of each GPU (None: alone on it)
    sleep_mode: bool = False  # colocated with learners on GPU: sleep while they train
    tensor_parallel_size: int = 1
    answer_length: int = 256  # rollout.max_tokens (a masked-diffusion engine's estimator span)
    prompt_mask_prob: float = 0.0  # the algorithm's (d1's prompt masking in the estimator)
    estimator: str = "one_step"  # the algorithm's likelihood estimator (rollouts.estimators), for a diffusion engine
    estimator_samples: int = 1  # its n (random masks or mask pairs averaged)
    options: dict = field(default_factory=dict)
