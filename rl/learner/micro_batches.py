"""Micro-batching: a rank's shard cut into the micro-batches it runs forward (and backward), as
padded rows or packed ones (`learner.share_prompt`, `learner.max_tokens_per_micro_batch`), each
with its teacher view when the batch has one, on the rank's device."""
from __future__ import annotations

import dataclasses

import torch

from rl.config import LearnerConfig
from rl.core.batch import MicroBatch, SequenceBatch, plan_micro_batches


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    def move(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in fields.items()}

    return dataclasses.replace(
        mb,
        input_ids=mb.input_ids.to(device),
        attention_mask=mb.attention_mask.to(device),
        prompt_lens=mb.prompt_lens.to(device),
        completion_ids=mb.completion_ids.to(device),
        completion_mask=mb.completion_mask.to(device),
        token_fields=move(mb.token_fields),
        seq_fields=move(mb.seq_fields),
        position_ids=None if mb.position_ids is None else mb.position_ids.to(device),
        predict_index=None if mb.predict_index is None else mb.predict_index.to(device),
        attention_pieces=None if mb.attention_pieces is None else mb.attention_pieces.to(device),
    )


class MicroBatcher:
    """Plans and builds one rank's micro-batches."""

    def __init__(self, cfg: LearnerConfig, pad_id: int, packed: bool, device: torch.device):
        self.cfg, self.pad_id, self.packed, self.device = cfg, pad_id, packed, device

    def micro_batches(self, batch: SequenceBatch, count: int | None) -> list[tuple[MicroBatch, MicroBatch | None] | None]:
        """This rank's (micro-batch, its teacher view or None) pairs; None marks a placeholder forward
        run only to keep ranks in step.

        Every rank must run the same number of forwards and backwards (ZeRO-3 gathers parameters
        in them, ZeRO-2 reduces gradients in them), so a short shard is padded with placeholders.
        """
        chunks = plan_micro_batches(batch, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch,
                                    self.cfg.share_prompt, count)
        if count is not None and len(chunks) > count:
            raise ValueError(f"{len(chunks)} micro-batches planned where every rank runs {count}.")
        return [self._prepare(batch.select(idx)) if idx else None for idx in chunks]

    def _tensors(self, sequences: SequenceBatch) -> MicroBatch:
        if self.packed:
            mb = MicroBatch.packed(sequences, self.pad_id, self.cfg.share_prompt)
        else:
            mb = MicroBatch.from_sequences(sequences, self.pad_id)
        return _to_device(mb, self.device)

    def _prepare(self, sequences: SequenceBatch) -> tuple[MicroBatch, MicroBatch | None]:
        mb = self._tensors(sequences)
        view = sequences.teacher_view()
        if view is None:
            return mb, None
        teacher = self._tensors(view)
        if not torch.equal(teacher.completion_ids, mb.completion_ids) or not torch.equal(
            teacher.completion_mask, mb.completion_mask
        ):
            raise ValueError(
                "The teacher view must end with the same completion tokens as the student's sequences: "
                "teacher_input_ids[i][teacher_prompt_lens[i]:] == input_ids[i][prompt_lens[i]:]."
            )
        return mb, teacher

    def placeholder(self, with_teacher: bool) -> tuple[MicroBatch, MicroBatch | None]:
        mb = self._tensors(SequenceBatch(input_ids=[[self.pad_id, self.pad_id]], prompt_lens=[1]))
        return mb, (mb if with_teacher else None)


def packed_layout(cfg: LearnerConfig, causal_lm: torch.nn.Module, diffusion: bool) -> bool:
    """Whether micro-batches are packed (shared prompts, a token budget) rather than padded rows."""
    # Masked-diffusion models attend both ways: they stay on the padded layout, one row per
    # sequence, which their own forward rebuilds anyway (masked_answer_input).
    packed = not diffusion and (cfg.share_prompt or cfg.max_tokens_per_micro_batch is not None)
    if packed and "sliding_attention" in (getattr(causal_lm.config, "layer_types", None) or []):
        raise ValueError(
            "This model has sliding-window attention layers, which the packed layout's explicit 4D mask "
            "would override (every layer would see the full window). Set learner.share_prompt=false and "
            "leave learner.max_tokens_per_micro_batch unset for it."
        )
    return packed
