"""IGPO (arXiv 2509.10396): diffu-GRPO plus an inpainting repair step, for masked-diffusion LLMs.

A group whose responses are all wrong (zero advantage, no gradient) is sampled again with chunks
of the row's reference reasoning fixed in the answer (inpainting), and up to lambda*G of its wrong
responses are replaced by correct inpainted ones. Hint tokens were not sampled by the policy, so
of each inpainted response's hint tokens only the top tau by entropy stay in the loss.
"""
from __future__ import annotations

import dataclasses
import random

from pydantic import Field

from rl.algorithms.base import Repair, Rollouts, SampledRound, register_algorithm
from rl.algorithms.diffu_grpo import DiffuGRPO, DiffuGRPOConfig
from rl.algorithms.grpo import padded, with_token_fields
from rl.algorithms.inpainting import HintSettings, build_hints, hint_loss_mask, is_all_wrong, plan_replacements, reasoning_token_ids
from rl.core import contracts
from rl.core.batch import SequenceBatch


class IGPOConfig(DiffuGRPOConfig, HintSettings):
    """diffu-GRPO's options, how hints are cut (HintSettings), and how repaired groups are trained."""

    replace_fraction: float = Field(
        0.5, ge=0, le=1, description="lambda: at most floor(lambda x G) wrong responses of a group are replaced [0.5]."
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


@register_algorithm
class IGPO(DiffuGRPO):
    name = "igpo"
    Config = IGPOConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seed = cfg.seed
        self.tokenizer = None

    def _filters_hints(self) -> bool:
        return self.cfg.hint_entropy_fraction < 1

    # The hint filter needs the old policy's entropies before the update.
    def _scores_before_update(self) -> bool:
        return super()._scores_before_update() or self._filters_hints()

    def _entropy_before_update(self) -> bool:
        return super()._entropy_before_update() or self._filters_hints()

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def needs_correctness(self) -> str | None:
        return "IGPO's all-wrong trigger and its replacements (only correct inpainted samples may replace)"

    def repair_groups(self, sampled: SampledRound, generate, score) -> Repair:
        counts = super().repair_groups(sampled, generate, score).counts
        triggered = [i for i, correct in enumerate(sampled.correct) if is_all_wrong(correct)]
        if not triggered:
            return Repair(sampled, [], counts)
        spec = dataclasses.replace(self.sampling_spec(), n=1)
        prompts, hints, owners = [], [], []
        # reveal_max 0: no hints at all, a plain resample of the group (the release's "inpainting
        # ratio = 0" baseline), which needs no reference reasoning.
        plain = self.cfg.reveal_max == 0
        for i in triggered:
            row = sampled.rows[i]
            if not plain and not row.get("solution"):
                counts["no_reference"] += 1
                continue
            trace = "" if plain else self.cfg.hint_prefix + row["solution"]
            reasoning = [] if plain else reasoning_token_ids(trace, row["answer"], self.tokenizer, self.cfg.exclude_answer)
            # Seeded by the group itself: the same rollouts get the same hints, on resume too.
            rng = random.Random(f"{self.seed}|{sampled.prompt_ids[i]}|{[c.token_ids for c in sampled.completions[i]]}")
            for hint in build_hints(reasoning, spec.max_tokens, self.cfg.group_size, rng, self.cfg):
                prompts.append(sampled.prompt_ids[i])
                hints.append(hint)
                owners.append(i)
        inpainted = [group[0] for group in generate(prompts, spec, hints)] if prompts else []
        rewards, correct = score(inpainted, [sampled.rows[i] for i in owners]) if inpainted else ([], [])
        counts["inpainted"] += len(inpainted)
        counts["inpainted_correct"] += sum(correct)
        completions = [list(group) for group in sampled.completions]
        group_rewards = [list(group) for group in sampled.rewards]
        group_correct = [list(group) for group in sampled.correct]
        counts["all_wrong_after"] = 0
        for i in triggered:
            mine = [k for k, owner in enumerate(owners) if owner == i]
            plan = plan_replacements(group_correct[i], [correct[k] for k in mine], self.cfg.replace_fraction)
            for slot, pick in plan:
                k = mine[pick]
                completions[i][slot], group_rewards[i][slot], group_correct[i][slot] = inpainted[k], rewards[k], True
            counts["replaced"] += len(plan)
            counts["all_wrong_after"] += int(is_all_wrong(group_correct[i]))
        repaired = dataclasses.replace(sampled, completions=completions, rewards=group_rewards, correct=group_correct)
        return Repair(repaired, inpainted, counts)

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        batch, metrics = super().build_batch(rollouts)
        hint_mask = [
            [float(h) for h in c.hint_mask] if c.hint_mask is not None else [0.0] * len(c.token_ids)
            for group in rollouts.completions for c in group
        ]
        return with_token_fields(batch, hint_mask=hint_mask), metrics

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> tuple[SequenceBatch, dict[str, float]]:
        batch, metrics = super().use_policy_scores(batch, logprobs, entropies)
        if self.cfg.hint_entropy_fraction >= 1:
            return batch, metrics
        hint, completion_mask = padded(batch.token_fields["hint_mask"])
        entropy, _ = padded(entropies)
        loss_mask, _ = padded(batch.token_fields[contracts.LOSS_MASK])
        keep = hint_loss_mask(entropy, hint, completion_mask, self.cfg.hint_entropy_fraction) * loss_mask
        lens = [len(r) for r in entropies]
        kept = [int(keep[i, :n].sum()) for i, n in enumerate(lens)]
        batch = with_token_fields(batch, **{contracts.LOSS_MASK: [keep[i, :n].tolist() for i, n in enumerate(lens)]})
        # The normaliser counts the tokens that stay in the loss, as when the mask was first built.
        batch = dataclasses.replace(batch, loss_normalizer=self.normalizer([k for k in kept if k], len(lens), len(lens) // self.cfg.group_size))
        # group_token_mean: each group's token count changed with the mask (build_batch's groups of G).
        batch = self.with_group_weights(batch, [self.cfg.group_size] * (len(lens) // self.cfg.group_size))
        metrics["igpo/hint_tokens_kept"] = float((keep * hint).sum())
        return batch, metrics
