"""OPSD: on-policy self-distillation (arXiv 2601.18734).

One rollout per problem from the student context; the same completion is scored under a teacher
context (problem + reference solution), and the student is pulled toward the teacher's
next-token distribution at every completion position. No reward enters the loss (rewards are
still computed, for the accuracy curve).
"""
from __future__ import annotations

import torch

from rl.algorithms import divergences, losses
from rl.algorithms.base import Algorithm, Rollouts, register_algorithm
from rl.learner.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.data import build_teacher_prompt
from rollouts.types import SamplingSpec


@register_algorithm("opsd")
class OPSD(Algorithm):
    needs_teacher = True

    def __init__(self, cfg):
        self.cfg = cfg.opsd
        self.data_cfg = cfg.data
        self.rollout_cfg = cfg.rollout
        self.agg_mode = divergences.AGGREGATION[self.cfg.aggregation]
        self.tokenizer = None

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def loss_temperature(self) -> float:
        return self.rollout_cfg.temperature if self.cfg.scale_logits_by_temperature else 1.0

    def sampling_spec(self) -> SamplingSpec:
        r = self.rollout_cfg
        return SamplingSpec(n=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens)

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        if self.tokenizer is None:
            raise RuntimeError("OPSD builds teacher prompts with the tokenizer: call attach_tokenizer first.")
        input_ids, prompt_lens, teacher_ids, teacher_lens = [], [], [], []
        for row, prompt, group in zip(rollouts.rows, rollouts.prompt_ids, rollouts.completions):
            teacher_prompt = build_teacher_prompt(
                row, self.data_cfg, self.tokenizer, self.cfg.teacher_instruction, self.cfg.teacher_enable_thinking
            )
            for c in group:
                input_ids.append(list(prompt) + list(c.token_ids))
                prompt_lens.append(len(prompt))
                teacher_ids.append(teacher_prompt + list(c.token_ids))
                teacher_lens.append(len(teacher_prompt))
        lens = [len(x) - p for x, p in zip(input_ids, prompt_lens)]
        batch = SequenceBatch(
            input_ids=input_ids,
            prompt_lens=prompt_lens,
            loss_normalizer=losses.step_normalizer(lens, self.agg_mode),
            teacher_input_ids=teacher_ids,
            teacher_prompt_lens=teacher_lens,
        )
        return batch, {"teacher_prompt_length": sum(teacher_lens) / len(teacher_lens)}

    def _per_token(self, out: PolicyOutputs, mb: MicroBatch) -> torch.Tensor:
        c = self.cfg
        if c.token_loss == "sampled":
            # Cheap in compute, not in memory: both logit sets are materialised here.
            teacher_logits = divergences.chunk_logits(
                out.teacher_hidden, out.teacher_lm_head_weight if out.teacher_lm_head_weight is not None
                else out.lm_head_weight, out.temperature
            )
            student_lp = losses.token_logprobs(out.logits(), mb.completion_ids)
            teacher_lp = losses.token_logprobs(teacher_logits.detach(), mb.completion_ids)
            return divergences.sampled_token_loss(student_lp, teacher_lp)
        return divergences.chunked_divergence(
            out.hidden,
            out.teacher_hidden,
            out.lm_head_weight,
            mb.completion_mask,
            kind=c.divergence,
            beta=c.jsd_beta,
            temperature=out.temperature,
            clip=c.clip,
            top_k=c.top_k if c.token_loss == "top_k" else None,
            chunk_size=c.chunk_size,
            teacher_lm_head_weight=out.teacher_lm_head_weight,
        )

    def loss(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = mb.completion_mask
        per_token = self._per_token(out, mb)
        loss = losses.aggregate(per_token, mask, self.agg_mode, mb.loss_normalizer)
        return loss, {"divergence_sum": float((per_token.detach() * mask).sum()), "tokens": float(mask.sum())}
