"""IGPO (arXiv 2509.10396) and diffu-GRPO (d1, arXiv 2504.12216) for masked diffusion LLMs.

Both are GRPO on the one-step log-probability estimator (the learner's masked-diffusion forward),
with advantages r - mean(r). IGPO adds one thing, in the sampling phase: a group whose responses
are all wrong (zero advantage, no gradient) is sampled again with chunks of the row's reference
reasoning fixed in the answer (inpainting), and up to lambda*G of its wrong responses are replaced
by correct inpainted ones. Hint tokens were not sampled by the policy, so of each inpainted
response's hint tokens only the top tau by entropy stay in the loss.
"""
from __future__ import annotations

import dataclasses
import random

from rl.algorithms import losses
from rl.algorithms.base import Rollouts, SampledRound, register_algorithm
from rl.algorithms.grpo import GRPO, _padded
from rl.learner.batch import SequenceBatch
from rl.algorithms.inpainting import HintSettings, build_hints, hint_loss_mask, is_all_wrong, plan_replacements, reasoning_token_ids
from rollouts.types import Completion

COUNTS = ("groups", "all_wrong_before", "all_wrong_after", "inpainted", "inpainted_correct", "replaced", "no_reference")


@register_algorithm("igpo")
class IGPO(GRPO):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.model.kind != "masked_diffusion":
            raise ValueError(
                f"algorithm={cfg.algorithm} trains masked-diffusion models; set model.kind=masked_diffusion "
                "and rollout.engine=diffusion (or use algorithm=grpo for a causal model)."
            )
        self.igpo = cfg.igpo
        self.inpainting = cfg.igpo.inpainting and cfg.algorithm == "igpo"
        self.seed = cfg.seed
        self.hint_settings = HintSettings(
            chunk_min=cfg.igpo.chunk_min, chunk_max=cfg.igpo.chunk_max, reveal_min=cfg.igpo.reveal_min,
            reveal_max=cfg.igpo.reveal_max, free_tail=cfg.igpo.free_tail, exclude_answer=cfg.igpo.exclude_answer,
            released_variant=cfg.igpo.released_variant,
        )
        self.hint_prefix = cfg.igpo.hint_prefix
        # The hint filter needs the old policy's entropies before the update.
        self.filters_hints = self.inpainting and cfg.igpo.hint_entropy_fraction < 1
        self.wants_entropy = self.wants_entropy or self.filters_hints
        self.needs_policy_scores = self.needs_policy_scores or self.filters_hints
        self.policy_scores_from_training = self.cfg.track_mismatch and not self.needs_policy_scores
        self.tokenizer = None
        self._counts = dict.fromkeys(COUNTS, 0)

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def loss_temperature(self) -> float:
        # The one-step estimator is read at temperature 1, as the engines report it: the sampling
        # temperature shapes the diffusion sampler's choices, not a per-token distribution.
        return 1.0

    # ------------------------------------------------------------------ inpainting

    def repair_groups(self, sampled: SampledRound, generate, score) -> list[Completion]:
        self._counts["groups"] += len(sampled.rows)
        triggered = [i for i, correct in enumerate(sampled.correct) if is_all_wrong(correct)]
        self._counts["all_wrong_before"] += len(triggered)
        if not self.inpainting or not triggered:
            self._counts["all_wrong_after"] += len(triggered)
            return []
        spec = dataclasses.replace(self.sampling_spec(), n=1)
        g = self.cfg.group_size
        prompts, hints, owners = [], [], []
        for i in triggered:
            row = sampled.rows[i]
            if not row.get("solution"):
                self._counts["no_reference"] += 1
                continue
            trace = self.hint_prefix + row["solution"]
            reasoning = reasoning_token_ids(trace, row["answer"], self.tokenizer, self.hint_settings.exclude_answer)
            # Seeded by the group itself: the same rollouts get the same hints, on resume too.
            rng = random.Random(f"{self.seed}|{sampled.prompt_ids[i]}|{[c.token_ids for c in sampled.completions[i]]}")
            for hint in build_hints(reasoning, spec.max_tokens, g, rng, self.hint_settings):
                prompts.append(sampled.prompt_ids[i])
                hints.append(hint)
                owners.append(i)
        inpainted = [group[0] for group in generate(prompts, spec, hints)] if prompts else []
        rewards, correct = score(inpainted, [sampled.rows[i] for i in owners]) if inpainted else ([], [])
        self._counts["inpainted"] += len(inpainted)
        self._counts["inpainted_correct"] += sum(correct)
        for i in triggered:
            mine = [k for k, owner in enumerate(owners) if owner == i]
            plan = plan_replacements(sampled.correct[i], [correct[k] for k in mine], self.igpo.replace_fraction)
            for slot, pick in plan:
                k = mine[pick]
                sampled.completions[i][slot] = inpainted[k]
                sampled.rewards[i][slot] = rewards[k]
                sampled.correct[i][slot] = True
            self._counts["replaced"] += len(plan)
            self._counts["all_wrong_after"] += int(is_all_wrong(sampled.correct[i]))
        return inpainted

    # ------------------------------------------------------------------ batch and hint filter

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        batch, metrics = super().build_batch(rollouts)
        completions = [c for group in rollouts.completions for c in group]
        batch.token_fields["hint_mask"] = [
            [float(h) for h in c.hint_mask] if c.hint_mask is not None else [0.0] * len(c.token_ids) for c in completions
        ]
        counts, self._counts = self._counts, dict.fromkeys(COUNTS, 0)
        groups = max(counts["groups"], 1)
        metrics.update({
            "igpo/all_wrong_fraction_before": counts["all_wrong_before"] / groups,
            "igpo/all_wrong_fraction_after": counts["all_wrong_after"] / groups,
            "igpo/replaced": counts["replaced"],
            "igpo/inpainted": counts["inpainted"],
            "igpo/inpainted_accuracy": counts["inpainted_correct"] / max(counts["inpainted"], 1),
            "igpo/groups_without_reference": counts["no_reference"],
            "igpo/hint_tokens": sum(map(sum, batch.token_fields["hint_mask"])),
        })
        return batch, metrics

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> dict[str, float]:
        metrics = super().use_policy_scores(batch, logprobs, entropies)
        if not self.filters_hints:
            return metrics
        hint, completion_mask = _padded(batch.token_fields["hint_mask"])
        entropy, _ = _padded(entropies)
        loss_mask, _ = _padded(batch.token_fields["loss_mask"])
        keep = hint_loss_mask(entropy, hint, completion_mask, self.igpo.hint_entropy_fraction) * loss_mask
        lens = [len(r) for r in entropies]
        batch.token_fields["loss_mask"] = [keep[i, :n].tolist() for i, n in enumerate(lens)]
        # The normaliser counts the tokens that stay in the loss, as when the mask was first built.
        kept = [int(keep[i, :n].sum()) for i, n in enumerate(lens)]
        constant = self.cfg.loss_constant or float(self.rollout_cfg.max_tokens * len(lens))
        batch.loss_normalizer = losses.step_normalizer([k for k in kept if k] or [0], self.cfg.loss_agg, constant)
        metrics["igpo/hint_tokens_kept"] = float((keep * hint).sum())
        return metrics


@register_algorithm("diffu_grpo")
class DiffuGRPO(IGPO):
    """IGPO with inpainting off: GRPO on the one-step estimator (d1)."""
