"""The contract every rollout engine implements, and the factory that picks one.

Log-probability conventions (shared by every engine, so that the learner can rely on them):

- `generate` returns, per sampled token, its log-probability under the distribution it was
  actually drawn from: softmax(logits / T), restricted to the top-k / top-p set when those cuts
  are active and renormalised over that set (vLLM's `logprobs_mode="processed_logprobs"`).
  With `top_k=-1, top_p=1` this is exactly log_softmax(logits / T), which is what the learner
  recomputes; with a cut, a learner that recomputes log_softmax(logits / T) sees a larger
  logprob gap by construction. Greedy decoding (T=0) reports log_softmax(logits).
- `score` returns log p(token | prefix) at temperature 1 with no cut, under the engine's current
  weights: the quantity to compare with the learner after each weight push.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from rl.core.types import Completion, SamplingSpec, ScoringRequest


class RolloutEngine(ABC):
    @abstractmethod
    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, hints: list[dict[int, int]] | None = None
    ) -> list[list[Completion]]:
        """`spec.n` completions for each prompt, in prompt order. `hints[i]` (completion position ->
        token id) fixes tokens of prompt i's completions: inpainting, which only masked-diffusion
        engines can do."""

    @abstractmethod
    def set_step_seed(self, seed: int) -> None:
        """Reseed the sampler: the next `generate` calls sample as they would right after any
        other `set_step_seed(seed)` with the same weights, whatever ran in between."""

    @abstractmethod
    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        """log p(token_ids[t] | prompt_ids + token_ids[:t]) at temperature 1, one list per request."""

    @abstractmethod
    def update_weights(self, state_dict: dict) -> None:
        """Load tensors named as in a transformers model's `state_dict()`; a subset is allowed."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory and processes."""

    # The collective weight transfer (rl.sync.weight_sync.CollectiveSync): the engine's workers join a
    # group with learner rank 0 and load what it broadcasts.

    def weight_ranks(self) -> int:
        """How many members of the weight group this engine brings (its worker processes)."""
        return 1

    @abstractmethod
    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, nccl: bool) -> None:
        """Join the group whose store listens at host:port as ranks first_rank, first_rank+1, ...
        (nccl: receive on the engine's GPUs; else through host memory over gloo)."""

    @abstractmethod
    def receive_weights(self) -> None:
        """Load the weights learner rank 0 broadcasts to the group now (rl.sync.weight_sync.send_stream)."""

    @abstractmethod
    def load_shared_weights(self, path: str, manifest: list, size: int) -> None:
        """Load the weights learner rank 0 wrote into the shared-memory file at `path` on this node
        (rl.sync.weight_sync.write_shared, whose manifest and length these are)."""


class TorchModelEngine(RolloutEngine):
    """An engine around a plain torch model in this process (`self.model`, `self.max_model_len`):
    the HF-generate and masked-diffusion engines."""

    def _check_lengths(self, lengths: list[int]) -> None:
        if max(lengths, default=0) > self.max_model_len:
            raise ValueError(f"sequence of {max(lengths)} tokens exceeds max_model_len={self.max_model_len}")

    def update_weights(self, state_dict: dict) -> None:
        import torch

        check_state_dict(state_dict, {k: tuple(v.shape) for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=False)

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, nccl: bool) -> None:
        from rl.sync.weight_sync import join_group, transfer_device

        self._weight_device = transfer_device(next(self.model.parameters()).device, nccl)
        self._weight_group = join_group(host, port, first_rank, world, self._weight_device)

    def receive_weights(self) -> None:
        from rl.sync.weight_sync import receive_stream

        self.update_weights(dict(receive_stream(self._weight_group, self._weight_device)))

    def load_shared_weights(self, path: str, manifest: list, size: int) -> None:
        from rl.sync.weight_sync import read_shared

        self.update_weights(dict(read_shared(path, manifest, size)))

    def close(self) -> None:
        del self.model


def make_engine(
    kind: str,
    model_path: str,
    *,
    seed: int,
    dtype: str = "float32",
    max_model_len: int = 2048,
    kv_cache_gb: float = 1.0,
    gpu_memory_utilization: float | None = None,
    trust_remote_code: bool = False,
    diffusion: dict | None = None,
    sleep_mode: bool = False,
    tensor_parallel_size: int = 1,
) -> RolloutEngine:
    """Build a `kind` ("vllm", "hf" or "diffusion") engine; vLLM and transformers are imported only
    here. `diffusion`: the masked-diffusion engine's sampler settings (MaskedDiffusionEngine's kwargs).
    `sleep_mode`, `tensor_parallel_size`: vLLM on GPU (colocated engines sleep while learners train)."""
    common = dict(seed=seed, dtype=dtype, max_model_len=max_model_len, trust_remote_code=trust_remote_code)
    if kind == "vllm":
        from rollouts.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path, kv_cache_gb=kv_cache_gb, gpu_memory_utilization=gpu_memory_utilization,
            sleep_mode=sleep_mode, tensor_parallel_size=tensor_parallel_size, **common
        )
    if kind == "hf":
        from rollouts.hf_engine import HFEngine

        return HFEngine(model_path, **common)
    if kind == "diffusion":
        from rollouts.diffusion_engine import MaskedDiffusionEngine

        return MaskedDiffusionEngine(model_path, **common, **(diffusion or {}))
    raise ValueError(f"unknown rollout engine kind {kind!r}; choose 'vllm', 'hf' or 'diffusion'")


def refuse_hints(hints) -> None:
    if hints is not None:
        raise ValueError(
            "Inpainting hints need a masked-diffusion engine (rollout.engine=diffusion); an "
            "autoregressive engine cannot fix tokens ahead of the ones it samples."
        )


def check_state_dict(state_dict: dict, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Reject unknown names and wrong shapes before any tensor is loaded.

    A bad tensor half-way through vLLM's in-place reload leaves layers on the meta device and the
    engine unusable, so the whole dict is checked first.
    """
    unknown = sorted(set(state_dict) - set(expected_shapes))
    if unknown:
        raise ValueError(f"update_weights: unknown parameter names {unknown[:5]} (of {len(unknown)})")
    wrong = [
        f"{name}: got {tuple(t.shape)}, expected {expected_shapes[name]}"
        for name, t in state_dict.items()
        if tuple(t.shape) != expected_shapes[name]
    ]
    if wrong:
        raise ValueError(f"update_weights: wrong shapes {wrong[:5]} (of {len(wrong)})")
