"""The contract every rollout engine implements (rollouts.registry picks one by name).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rl.core.types import Completion, EngineSettings, SamplingSpec, ScoringRequest, TopK

NamedTensors = Iterable[tuple[str, Any]]


@dataclass
class WeightWorker:
    """One process that holds (part of) an engine's weights, as a weight transport sees it
    (rl.sync.weight_sync): `load(named_tensors)` loads tensors named as in the HF state dict into
    that process (its tensor-parallel shard), `rank` is its index among the engine's weight workers,
    `device` where it computes, and `state` a dict kept in that process for the transport (a
    collective group, say) from one call to the next."""

    load: Callable[[NamedTensors], None]
    rank: int
    device: Any
    state: dict = field(default_factory=dict)


class RolloutEngine(ABC):
    """Subclass this and register it (rollouts.registry.register_engine), or name the class as
    `rollout.engine=path/to/file.py:Class`. Its options go in the section `rollout.<name>`, typed by
    `Config` (a rl.core.schema.Section, or None for an engine without options of its own)."""

    name: ClassVar[str]
    Config: ClassVar[type | None] = None
    # What the engine can sample: the config refuses any other model kind, or a top-p/top-k cut.
    model_kinds: ClassVar[tuple[str, ...]] = ("causal",)
    sampling_cuts: ClassVar[bool] = True
    # Whether it can free its accelerator memory while learners colocated with it train.
    can_sleep: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, model_path: str, seed: int, settings: EngineSettings) -> "RolloutEngine":
        """Build the engine for a run (`settings.options`: its own section's values)."""
        return cls(model_path, seed=seed, settings=settings)

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

    def score_top_k(self, requests: list[ScoringRequest], k: int) -> list[TopK]:
        """Per request, at each of its token_ids' positions: the k most likely token ids at temperature 1,
        most likely first, their log-probs, and the log-prob of the token itself (what `score` gives):
        a teacher on engines with opsd.token_loss=top_k."""
        raise NotImplementedError(f"The {type(self).__name__} engine does not give top-k log-probs: use the vllm or "
                                  "hf engine for a teacher with opsd.token_loss=top_k, or token_loss=sampled.")

    @abstractmethod
    def load_weights(self, named_tensors: NamedTensors | Mapping) -> None:
        """Load tensors named as in a transformers model's `state_dict()` (a subset is allowed),
        in this process: the one way weights reach an engine."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory and processes."""

    def weight_workers(self) -> int:
        """How many processes hold the engine's weights (vLLM's tensor-parallel workers; 1 here)."""
        return 1

    def in_weight_workers(self, fn: Callable, *args) -> list:
        """fn(WeightWorker, *args) in every process holding the engine's weights, results in worker
        order: how a weight transport reaches them. Here: this process, loading with load_weights."""
        if not hasattr(self, "_weight_state"):
            self._weight_state = {}
        return [fn(WeightWorker(self.load_weights, 0, self.weight_device(), self._weight_state), *args)]

    def weight_device(self):
        """Where this engine's weights live (a transport's buffers go there)."""
        import torch

        return torch.device("cpu")

    def sleep(self) -> None:
        """Free accelerator memory while colocated learners train (engines with `can_sleep`)."""

    def wake_up(self) -> None:
        """Undo `sleep`."""


def named_items(named_tensors: NamedTensors | Mapping) -> list[tuple[str, Any]]:
    return list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)


class TorchModelEngine(RolloutEngine):
    """An engine around a plain torch model in this process (`self.model`, `self.max_model_len`):
    the HF-generate and masked-diffusion engines."""

    def _check_lengths(self, lengths: list[int]) -> None:
        if max(lengths, default=0) > self.max_model_len:
            raise ValueError(f"sequence of {max(lengths)} tokens exceeds max_model_len={self.max_model_len}")

    def load_weights(self, named_tensors: NamedTensors | Mapping) -> None:
        import torch

        state = dict(named_items(named_tensors))
        check_state_dict(state, {k: tuple(v.shape) for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            self.model.load_state_dict(state, strict=False)

    def weight_device(self):
        return next(self.model.parameters()).device

    def close(self) -> None:
        del self.model


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
        raise ValueError(f"load_weights: unknown parameter names {unknown[:5]} (of {len(unknown)})")
    wrong = [
        f"{name}: got {tuple(t.shape)}, expected {expected_shapes[name]}"
        for name, t in state_dict.items()
        if tuple(t.shape) != expected_shapes[name]
    ]
    if wrong:
        raise ValueError(f"load_weights: wrong shapes {wrong[:5]} (of {len(wrong)})")
