"""The training side's data: a step's sequences and the padded micro-batches the learner runs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceBatch:
    """One optimizer step's data, one row per completion.

    `token_fields` hold one value per completion token (advantages, old logprobs, ...), aligned
    with `input_ids[i][prompt_lens[i]:]`. `loss_normalizer` is the global denominator the loss
    divides by (tokens, sequences or a constant, decided by the algorithm over the WHOLE step,
    so that micro-batching and data parallelism do not change the loss).
    """

    input_ids: list[list[int]]
    prompt_lens: list[int]
    token_fields: dict[str, list[list[float]]] = field(default_factory=dict)
    seq_fields: dict[str, list[float]] = field(default_factory=dict)
    loss_normalizer: float = 1.0
    # A second context for the same completions (OPSD's teacher sees the reference solution):
    # teacher_input_ids[i] = teacher prompt + the SAME completion tokens as input_ids[i].
    teacher_input_ids: list[list[int]] | None = None
    teacher_prompt_lens: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def completion_lens(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lens)]

    def select(self, indices: list[int]) -> "SequenceBatch":
        return SequenceBatch(
            input_ids=[self.input_ids[i] for i in indices],
            prompt_lens=[self.prompt_lens[i] for i in indices],
            token_fields={k: [v[i] for i in indices] for k, v in self.token_fields.items()},
            seq_fields={k: [v[i] for i in indices] for k, v in self.seq_fields.items()},
            loss_normalizer=self.loss_normalizer,
            teacher_input_ids=None if self.teacher_input_ids is None else [self.teacher_input_ids[i] for i in indices],
            teacher_prompt_lens=None if self.teacher_prompt_lens is None else [self.teacher_prompt_lens[i] for i in indices],
        )

    def teacher_view(self) -> "SequenceBatch | None":
        """The teacher-context sequences as a batch of their own (same completions, same fields)."""
        if self.teacher_input_ids is None:
            return None
        return SequenceBatch(self.teacher_input_ids, self.teacher_prompt_lens, self.token_fields, self.seq_fields,
                             self.loss_normalizer)


@dataclass
class MicroBatch:
    """Right-padded tensors for one forward pass.

    input_ids/attention_mask: [B, L]. Completion-aligned tensors are [B, T] with T the longest
    completion: position t of row i is the completion's t-th token, predicted by the logits at
    input position prompt_len_i - 1 + t. `completion_mask` is 1 on real completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    token_fields: dict[str, torch.Tensor]
    seq_fields: dict[str, torch.Tensor]
    loss_normalizer: float

    @staticmethod
    def from_sequences(batch: SequenceBatch, pad_id: int = 0) -> "MicroBatch":
        n = len(batch)
        width = max(len(x) for x in batch.input_ids)
        comp_lens = batch.completion_lens()
        t_max = max(max(comp_lens), 1)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        completion_ids = torch.full((n, t_max), pad_id, dtype=torch.long)
        completion_mask = torch.zeros((n, t_max), dtype=torch.float32)
        fields = {k: torch.zeros((n, t_max), dtype=torch.float32) for k in batch.token_fields}
        for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            c = len(ids) - p
            completion_ids[i, :c] = torch.tensor(ids[p:])
            completion_mask[i, :c] = 1.0
            for k, v in batch.token_fields.items():
                fields[k][i, :c] = torch.tensor(v[i], dtype=torch.float32)
        return MicroBatch(
            input_ids=input_ids,
            attention_mask=attention,
            prompt_lens=torch.tensor(batch.prompt_lens, dtype=torch.long),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            token_fields=fields,
            seq_fields={k: torch.tensor(v, dtype=torch.float32) for k, v in batch.seq_fields.items()},
            loss_normalizer=batch.loss_normalizer,
        )

    def completion_aligned(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, L, D] values of the input positions that predict each completion token -> [B, T, D]
        (logits, or hidden states before the output layer)."""
        t = self.completion_ids.shape[1]
        positions = torch.arange(t, device=per_position.device)
        offsets = (self.prompt_lens.to(per_position.device) - 1)[:, None] + positions[None, :]
        offsets = offsets.clamp(max=per_position.shape[1] - 1)
        return torch.gather(per_position, 1, offsets[..., None].expand(-1, -1, per_position.shape[-1]))


@dataclass
class PolicyOutputs:
    """What a loss function sees of one micro-batch: `loss_fn(out, mb) -> (scalar, metrics)`.

    All [B, T, ...] tensors are completion-aligned like `MicroBatch.completion_ids`: position t of
    row i belongs to the input position that predicts the row's t-th completion token.
    hidden: [B, T, H] final hidden states (after the final norm), with grad.
    lm_head_weight: [V, H] output layer (logits = hidden @ W^T), with grad. Pass it with `hidden`
        to `rl.divergences.chunked_divergence` / `rl.entropy.chunked_entropy` so that [B, T, V]
        logits never exist at once. None for masked-diffusion models, whose forward is the whole
        model's: `hidden` then holds the [B, T, V] logits at the answer positions (one-step
        estimator: every answer position masked), which those functions accept as such.
    temperature: the learner's logit divisor (the sampling temperature, or 1).
    teacher_hidden: [B, T, H] without grad: the teacher's hidden states at the SAME completion
        tokens, from its forward on the batch's teacher view; None when the batch has none.
    teacher_lm_head_weight: the teacher's own output layer when it is another copy (frozen or EMA
        teacher of a fully trained model); None when it is `lm_head_weight` itself.
    """

    hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    temperature: float = 1.0
    teacher_hidden: torch.Tensor | None = None
    teacher_lm_head_weight: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """[B, T, V] float32 logits / temperature, materialised: for small vocabularies and simple losses."""
        logits = self.hidden if self.lm_head_weight is None else torch.nn.functional.linear(self.hidden, self.lm_head_weight)
        return logits.float() / self.temperature
