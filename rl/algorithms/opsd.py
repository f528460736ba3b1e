"""OPSD: on-policy self-distillation (arXiv 2601.18734).

One rollout per problem from the student context; the same completion is scored under a teacher
context (problem + reference solution), and the student is pulled toward the teacher's
next-token distribution at every completion position. No reward enters the loss (rewards are
still computed, for the accuracy curve).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from rl.algorithms import advantages as group_advantages, distill_metrics, divergences, losses
from rl.core import contracts, kernels
from rl.algorithms.diffu_grpo import EstimatorChoice
from rl.algorithms.base import Algorithm, Requirements, Rollouts, ScoringEngines, Update, register_algorithm
from rl.core.schema import Section
from rl.data import build_teacher_prompt
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.core.types import SamplingSpec, ScoringRequest


ANSWER_MASK = "answer_mask"  # token field: 1 on the final answer's tokens (the last \\boxed{...}), else 0
# Token field: the teacher's log-prob of each sampled token, from teacher engines (opsd.teacher.runs_on=engines).
TEACHER_LOGPROBS = "teacher_logprobs"
TEACHER_INDEX = "teacher_index"  # sequence field: which of several teachers (opsd.teacher.by_tag) scores it
# Token fields of k values a token: the teacher engines' top-k ids and their log-probs (token_loss=top_k).
TEACHER_TOP_IDS, TEACHER_TOP_LOGPROBS = "teacher_top_ids", "teacher_top_logprobs"


class TeacherConfig(Section):
    """The model that scores a batch's teacher view (OPSD's teacher, arXiv 2601.18734)."""

    kind: Literal["frozen", "live", "ema", "model"] = Field(
        "frozen",
        description="frozen: the initial policy (the paper's main setting; a live teacher was unstable "
        "there); with LoRA the same model with adapters disabled, else the frozen reference copy "
        "(ZeRO-3-sharded like the learner). live: the current policy under no_grad. ema: a copy "
        "whose weights follow an exponential moving average of the policy's, updated after every "
        "optimizer step (one more model copy, sharded under ZeRO-3, plus a float32 master of the "
        "trained weights on every rank for bf16 models; with LoRA only its adapters move). model: another "
        "model (`path`), loaded frozen on every learner rank and sharded like the reference (ZeRO-3); it "
        "must share the student's tokenizer.",
    )
    path: Optional[str] = Field(
        None,
        description="For kind=model: the teacher, as model.path names a model (a local HF folder, e.g. the "
        "output of `python -m rl.sft`; a hub id; or a registered built model). Its tokenizer must be the "
        "student's (same vocabulary): cross-tokenizer distillation is out of scope.",
    )
    privileged: bool = Field(
        True,
        description="True: the teacher sees the privileged context (opsd.teacher_template: the problem and the "
        "reference solution), OPSD. False: the teacher sees the student's own prompt, i.e. plain on-policy "
        "distillation (OPD); only meaningful with another model (kind=model) or a copy that differs from "
        "the policy (frozen, ema).",
    )
    runs_on: Literal["learner", "engines"] = Field(
        "learner",
        description="For kind=model: learner: the teacher sits on every learner rank, frozen and sharded like the "
        "reference (ZeRO-3), and every token loss works. engines: a teacher too large to sit beside the student "
        "runs on engines of its own in the Ray pool (rollout.engine, `num_engines` x `gpus_per_engine`, in the "
        "resource plan) and scores the student's sampled tokens (vLLM's prompt log-probs, with their top k for "
        "token_loss=top_k), so opsd.token_loss=sampled or top_k (and mode=rlsd, which reads the sampled tokens' "
        "log-probs); not full.",
    )
    num_engines: int = Field(1, ge=1, description="runs_on=engines: how many teacher engines (each scores a share of the batch).")
    gpus_per_engine: int = Field(1, ge=1, description="runs_on=engines: GPUs per teacher engine (tensor parallel on GPU; ignored on CPU).")
    max_model_len: Optional[int] = Field(
        None, ge=1, description="runs_on=engines: the longest teacher view (prompt, reference solution, completion) "
        "an engine takes. None: the teacher's own context length, at most 4096.",
    )
    by_tag: dict[str, str] = Field(
        {},
        description="Several teachers, one per data source (multi-teacher OPD): {tag: model path}; a row whose "
        "`tag_key` column holds a listed tag is scored by that teacher, any other row by `path`. Needs "
        "runs_on=engines: each teacher gets `num_engines` engines of its own. Every teacher must share the "
        "student's tokenizer.",
    )
    tag_key: str = Field("source", description="The row column whose value picks the row's teacher in `by_tag`.")
    ema_decay: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="For kind=ema: teacher <- decay * teacher + (1 - decay) * policy after each step. "
        "0.999: the released EMA run (siyan-zhao/OPSD scripts/run_opsd_ema.sh, --ema_decay 0.999); the "
        "paper gives no value. Over a 100-step run the teacher then stays within ~10% of the initial "
        "policy, close to the paper's frozen teacher.",
    )

    @model_validator(mode="after")
    def _path_with_model(self):
        if self.kind == "model" and not self.path:
            raise ValueError("opsd.teacher.kind=model needs opsd.teacher.path: the teacher model's folder, hub id "
                             "or registered name.")
        if self.kind != "model" and self.path:
            raise ValueError(f"opsd.teacher.path is only read with opsd.teacher.kind=model (kind is {self.kind}): "
                             "set kind=model to distil from that model, or drop the path.")
        if self.runs_on == "engines" and self.kind != "model":
            raise ValueError(f"opsd.teacher.runs_on=engines puts another model on engines of its own, but kind is "
                             f"{self.kind} (the policy itself, which lives on the learner ranks): set "
                             "opsd.teacher.kind=model with opsd.teacher.path, or runs_on=learner.")
        if self.by_tag and self.runs_on != "engines":
            raise ValueError("opsd.teacher.by_tag routes rows to several teachers, each on engines of its own: set "
                             "opsd.teacher.runs_on=engines (the learner ranks hold at most one teacher).")
        if self.kind == "live" and not self.privileged:
            raise ValueError("opsd.teacher.kind=live with privileged=false scores the student's own prompt with "
                             "the student itself: the divergence is zero and nothing trains. Use kind=model with "
                             "a teacher path for on-policy distillation, or privileged=true for OPSD.")
        return self


class OPSDConfig(EstimatorChoice):
    """On-policy self-distillation (arXiv 2601.18734): the student is pulled toward the same model
    shown the reference solution, at every position of the student's own rollout. A masked-diffusion
    student is compared with its teacher through `estimator`: one_step compares the two models' guesses
    with every answer position masked, which never reads the student's sample; mc_elbo and coupled
    compare them at randomly masked positions given the student's other tokens, on-policy."""

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
    teacher_template: str = Field(
        "{problem}\n\n=== Reference solution ===\n{solution}\n=== End of reference solution ===\n\n"
        "{teacher_instruction}\n{instruction}",
        description="The teacher's user message: `{problem}`, `{solution}` (the reference solution), "
        "`{teacher_instruction}` and `{instruction}` (data.instruction) are filled in. The default is the "
        "paper's structure in our wording; opsd_qwen sets the release's message word for word "
        "(siyan-zhao/OPSD data_collator.py:28-34, 88-94 at 85d6bf9).",
    )
    teacher_enable_thinking: Optional[bool] = Field(
        True, description="Teacher-side chat-template thinking switch (student off, teacher on: the paper's strongest pairing)."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Which model scores the teacher view.")
    mode: Literal["distill", "rlsd"] = Field(
        "distill",
        description="distill: the student is pulled toward the teacher at every position (OPSD, OPD). rlsd: RLSD "
        "(arXiv 2604.03128): the verifiable reward's group advantage A sets each sequence's direction and the "
        "teacher's per-token log-ratio only its size (rl.algorithms.divergences.rlsd_token_advantages), so a "
        "privileged teacher cannot pull the student toward its answer; needs group_size > 1.",
    )
    group_size: int = Field(1, ge=1, description="Completions sampled per prompt (rlsd: the group of its advantage).")
    rlsd_mix: float = Field(1.0, ge=0, le=1, description="rlsd: lambda in A * ((1 - lambda) + lambda * w_t); 0 is GRPO.")
    rlsd_clip: float = Field(0.2, gt=0, lt=1, description="rlsd: w_t is clipped to [1 - clip, 1 + clip].")
    leak_tokens: int = Field(
        16, ge=1, description="opsd/leak: the completion's first this many tokens, in which a stated gold answer counts as leaked."
    )

    @model_validator(mode="after")
    def _rlsd_needs_groups(self):
        if self.mode == "rlsd" and self.group_size < 2:
            raise ValueError("opsd.mode=rlsd takes each sequence's direction from its group advantage (reward minus the "
                             "group's mean): set opsd.group_size to 2 or more (e.g. 8).")
        return self

    @model_validator(mode="after")
    def _engine_teacher_scores_sampled_tokens(self):
        if self.teacher.runs_on != "engines":
            return self
        if self.mode == "distill" and self.token_loss == "full":
            raise ValueError(
                "opsd.teacher.runs_on=engines: the teacher's engines return log-probs of the sampled tokens and of their "
                "top k, not the whole distribution over the vocabulary that token_loss=full compares. Set "
                "opsd.token_loss=sampled or top_k, or opsd.teacher.runs_on=learner to keep the teacher on the learner "
                "ranks (every token loss)."
            )
        if self.scale_logits_by_temperature:
            raise ValueError(
                "opsd.teacher.runs_on=engines: the engines score at temperature 1, so the teacher's logits cannot be "
                "divided by rollout.temperature (opsd.scale_logits_by_temperature). Turn it off, or keep the teacher "
                "on the learner ranks (opsd.teacher.runs_on=learner)."
            )
        return self


def vocabulary_mismatch(student_tokenizer, teacher_tokenizer) -> str | None:
    """Why two tokenizers do not share a vocabulary (None when they do): the same token -> id map."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return None
    differ = sorted(t for t in set(student) | set(teacher) if student.get(t) != teacher.get(t))
    shown = ", ".join(f"{t!r} ({student.get(t)} vs {teacher.get(t)})" for t in differ[:5])
    return f"{len(student)} vs {len(teacher)} tokens, {len(differ)} differ in id (e.g. {shown})"


def check_teacher_tokenizer(student_tokenizer, teacher_path: str, trust_remote_code: bool = False) -> str:
    """The teacher's local folder (resolved like model.path), refused (ModelError) when its tokenizer's
    vocabulary is not the student's."""
    from transformers import AutoTokenizer

    from rl.models import ModelError, resolve_model_path

    folder = resolve_model_path(teacher_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    why = vocabulary_mismatch(student_tokenizer, teacher_tokenizer)
    if why is not None:
        raise ModelError(
            f"opsd.teacher.path={teacher_path} does not share the student's tokenizer ({why}). The teacher scores "
            "the student's own token ids at every position, so both must use the same vocabulary: pick a teacher "
            "of the student's model family with the same tokenizer (e.g. the student's model after "
            "`python -m rl.sft`). Cross-tokenizer distillation (aligning two vocabularies) is out of scope."
        )
    return folder


@dataclass(frozen=True)
class DistillationLoss:
    """The loss the learner runs: the per-token divergence from the teacher, aggregated over the
    step. Only options: pickled every step."""

    token_loss: str
    divergence: str
    jsd_beta: float
    clip: float | None
    top_k: int
    chunk_size: int
    aggregation: str
    mode: str = "distill"
    rlsd_mix: float = 1.0
    rlsd_clip: float = 0.2

    @classmethod
    def from_config(cls, c: OPSDConfig) -> "DistillationLoss":
        return cls(token_loss=c.token_loss, divergence=c.divergence, jsd_beta=c.jsd_beta, clip=c.clip, top_k=c.top_k,
                   chunk_size=c.chunk_size, aggregation=divergences.AGGREGATION[c.aggregation], mode=c.mode,
                   rlsd_mix=c.rlsd_mix, rlsd_clip=c.rlsd_clip)

    def _sampled_scores(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student log-probs of the sampled tokens, with grad in rlsd mode; the student's entropy; the
        teacher's log-probs of the same tokens, no grad), chunked over positions."""
        args = (mb.completion_ids, mb.completion_mask, out.temperature, self.chunk_size)
        if TEACHER_LOGPROBS in mb.token_fields:  # scored by the teacher's engines
            teacher_lp = mb.token_fields[TEACHER_LOGPROBS]
        elif out.estimator_passes is not None:  # a diffusion student on an estimator of several passes
            with torch.no_grad():
                teacher_lp, _ = out.teacher_outputs().token_logprobs_and_entropy(*args[:2], self.chunk_size)
            with torch.enable_grad() if self.mode == "rlsd" else torch.no_grad():
                logp, entropy = out.token_logprobs_and_entropy(*args[:2], self.chunk_size)
            return logp, entropy, teacher_lp
        else:
            teacher_weight = out.lm_head_weight if out.teacher_lm_head_weight is None else out.teacher_lm_head_weight
            with torch.no_grad():
                teacher_lp, _ = kernels.chunked_token_logprobs_and_entropy(
                    out.teacher_hidden, None if teacher_weight is None else teacher_weight.detach(), *args)
        if self.mode == "rlsd" or (TEACHER_LOGPROBS in mb.token_fields and TEACHER_TOP_IDS not in mb.token_fields):
            logp, entropy = kernels.chunked_token_logprobs_and_entropy(out.hidden, out.lm_head_weight, *args)
            return logp, entropy, teacher_lp
        with torch.no_grad():
            logp, entropy = kernels.chunked_token_logprobs_and_entropy(
                out.hidden.detach(), None if out.lm_head_weight is None else out.lm_head_weight.detach(), *args)
        return logp, entropy, teacher_lp

    def _per_token(self, out: PolicyOutputs, mb: MicroBatch, logp: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
        if out.estimator_passes is not None:
            return self._per_token_over_passes(out, mb, teacher_lp)
        if TEACHER_TOP_IDS in mb.token_fields:  # the teacher engines' top k
            return divergences.top_k_divergence_from_ids(
                out.hidden, out.lm_head_weight, mb.token_fields[TEACHER_TOP_IDS], mb.token_fields[TEACHER_TOP_LOGPROBS],
                kind=self.divergence, beta=self.jsd_beta, clip=self.clip, chunk_size=self.chunk_size)
        if TEACHER_LOGPROBS in mb.token_fields:  # logp has its gradient (chunked, no [B, T, V] tensor)
            return divergences.sampled_token_loss(logp, teacher_lp)
        if self.token_loss == "sampled":
            # Cheap in compute, not in memory: both logit sets are materialised here.
            teacher_logits = kernels.chunk_logits(
                out.teacher_hidden, out.teacher_lm_head_weight if out.teacher_lm_head_weight is not None
                else out.lm_head_weight, out.temperature
            )
            student_lp = kernels.token_logprobs(out.logits(), mb.completion_ids)
            teacher_lp = kernels.token_logprobs(teacher_logits.detach(), mb.completion_ids)
            return divergences.sampled_token_loss(student_lp, teacher_lp)
        return divergences.chunked_divergence(
            out.hidden,
            out.teacher_hidden,
            out.lm_head_weight,
            mb.completion_mask,
            kind=self.divergence,
            beta=self.jsd_beta,
            temperature=out.temperature,
            clip=self.clip,
            top_k=self.top_k if self.token_loss == "top_k" else None,
            chunk_size=self.chunk_size,
            teacher_lm_head_weight=out.teacher_lm_head_weight,
        )

    def _per_token_over_passes(self, out: PolicyOutputs, mb: MicroBatch, teacher_lp: torch.Tensor) -> torch.Tensor:
        """A masked-diffusion student on mc_elbo/coupled: each pass's divergence at the tokens it masks,
        the student and the teacher both seeing the student's other tokens, weighted as the estimator
        weighs that pass's log-probs (a token's weights sum to 1 in expectation, e.g. 1/t for mc_elbo)."""
        from rollouts.estimators.common import weighted

        if self.token_loss == "sampled":  # on the estimator's terms, as for a causal student
            logp, _ = out.token_logprobs_and_entropy(mb.completion_ids, mb.completion_mask, self.chunk_size)
            return divergences.sampled_token_loss(logp, teacher_lp)
        total = 0
        for (logits, weight), (teacher_logits, teacher_weight) in zip(out.estimator_passes, out.teacher_estimator_passes):
            if not torch.equal(weight, teacher_weight):
                raise RuntimeError("The teacher's estimator passes mask other positions than the student's: both must "
                                   "draw from the completion (rollouts.estimators.rows.row_generator).")
            per_pass = divergences.chunked_divergence(
                logits, teacher_logits, None, mb.completion_mask * (weight != 0), kind=self.divergence, beta=self.jsd_beta,
                temperature=out.temperature, clip=self.clip, top_k=self.top_k if self.token_loss == "top_k" else None,
                chunk_size=self.chunk_size)
            total = total + weighted(weight, per_pass)
        return total

    def __call__(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = mb.completion_mask
        logp, entropy, teacher_lp = self._sampled_scores(out, mb)
        if self.mode == "rlsd":
            advantages = divergences.rlsd_token_advantages(
                mb.token_fields[contracts.ADVANTAGES], teacher_lp - logp.detach(), self.rlsd_mix, self.rlsd_clip)
            per_token = -advantages * logp  # on-policy (one update per batch): the ratio is 1
        else:
            per_token = self._per_token(out, mb, logp, teacher_lp)
        loss = losses.aggregate(per_token, mask, self.aggregation, mb.loss_normalizer)
        # log p_S(y) - log p_T(y) at the sampled token: an unbiased one-sample estimate of KL(p_S || p_T)
        # there, whatever the token loss; split into the final answer (the last \boxed{...}) and the rest.
        kl = (logp.detach() - teacher_lp) * mask
        answer = mb.token_fields.get(ANSWER_MASK, torch.zeros_like(mask)) * mask
        if logp.requires_grad:
            out.keep_logprobs(logp)
        return loss, {
            "divergence_sum": float((per_token.detach() * mask).sum()), "tokens": float(mask.sum()),
            "entropy_sum": float((entropy * mask).sum()),
            "kl_answer_total": float((kl * answer).sum()), "answer_tokens_total": float(answer.sum()),
            "kl_reasoning_total": float((kl * (mask - answer)).sum()), "reasoning_tokens_total": float((mask - answer).sum()),
        }


@register_algorithm
class OPSD(Algorithm):
    name = "opsd"
    Config = OPSDConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.data_cfg = cfg.data
        self.rollout_cfg = cfg.rollout
        teacher = self.cfg.teacher
        on_engines = teacher.runs_on == "engines"
        # With the teacher on engines: one scoring model per teacher, the default (`path`) first.
        self.teacher_paths = ({"opsd.teacher.path": teacher.path,
                               **{f"opsd.teacher.by_tag.{tag}": path for tag, path in teacher.by_tag.items()}}
                              if on_engines else {})
        if self.cfg.estimator != "one_step":
            if cfg.model.kind != "masked_diffusion":
                raise ValueError(f"opsd.estimator={self.cfg.estimator} scores a masked-diffusion student; a causal "
                                 "student's log-probs are exact: leave opsd.estimator=one_step.")
            if on_engines:
                raise ValueError(f"opsd.estimator={self.cfg.estimator} scores the teacher on the student's masks, "
                                 "which the learner draws: set opsd.teacher.runs_on=learner, or opsd.estimator=one_step.")
        self.requirements = Requirements(
            estimator=self.cfg.estimator, estimator_samples=self.cfg.estimator_samples,
            teacher=None if on_engines else teacher,
            scoring_engines=tuple(ScoringEngines(name, path, teacher.num_engines, teacher.gpus_per_engine,
                                                 teacher.max_model_len) for name, path in self.teacher_paths.items()),
        )
        self.loss = DistillationLoss.from_config(self.cfg)
        self.teacher_engines = None
        self.tokenizer = None
        self.trust_remote_code = cfg.model.trust_remote_code
        if self.cfg.teacher.kind == "model":
            self._check_teacher_early(cfg.model.path)

    def _check_teacher_early(self, student_path: str) -> None:
        """At validation (the launch's dry run too): the teacher path names a model, and, when both are
        local folders, its tokenizer is the student's (else attach_tokenizer checks, after resolving)."""
        from pathlib import Path

        from transformers import AutoTokenizer

        from rl.models import check_model_path

        student = None
        for teacher_path in self._teacher_model_paths():
            check_model_path(teacher_path)
            if Path(student_path).expanduser().is_dir() and Path(teacher_path).expanduser().is_dir():
                student = student or AutoTokenizer.from_pretrained(str(Path(student_path).expanduser()),
                                                                   trust_remote_code=self.trust_remote_code)
                check_teacher_tokenizer(student, teacher_path, self.trust_remote_code)

    def _teacher_model_paths(self) -> list[str]:
        return [self.cfg.teacher.path, *self.cfg.teacher.by_tag.values()]

    def attach_tokenizer(self, tokenizer) -> None:
        if self.cfg.teacher.kind == "model":
            for path in self._teacher_model_paths():
                check_teacher_tokenizer(tokenizer, path, self.trust_remote_code)
        self.tokenizer = tokenizer

    def attach_scoring_engines(self, engines: dict) -> None:
        self.teacher_engines = [engines[name] for name in self.teacher_paths]

    def _teacher_index(self, row: dict) -> int:
        """Which teacher scores this row: the position in teacher_paths of its tag's (0: the default)."""
        tag = row.get(self.cfg.teacher.tag_key)
        names = list(self.teacher_paths)
        name = f"opsd.teacher.by_tag.{tag}"
        return names.index(name) if tag is not None and name in names else 0

    def loss_temperature(self) -> float:
        return self.rollout_cfg.temperature if self.cfg.scale_logits_by_temperature else 1.0

    def sampling_spec(self) -> SamplingSpec:
        r = self.rollout_cfg
        return SamplingSpec(n=self.cfg.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_tokens=r.max_tokens)

    def provides(self) -> set[str]:
        return {contracts.ENTROPY, contracts.ADVANTAGES} if self.cfg.mode == "rlsd" else {contracts.ENTROPY}

    def _teacher_prompt(self, row: dict, prompt: list[int]) -> list[int]:
        if not self.cfg.teacher.privileged:
            return list(prompt)  # plain on-policy distillation: the student's own prompt
        return build_teacher_prompt(row, self.data_cfg, self.tokenizer, self.cfg.teacher_template,
                                    self.cfg.teacher_instruction, self.cfg.teacher_enable_thinking)

    def _group_advantages(self, rewards: list[list[float]]) -> list[list[float]]:
        """rlsd: each completion's GRPO advantage in its group, (r - mean) / (std + eps)."""
        flat = torch.tensor([r for group in rewards for r in group], dtype=torch.float32)
        adv = group_advantages.group_mean_std(flat, self.cfg.group_size).tolist()
        return [adv[i : i + len(g)] for i, g in zip(range(0, len(adv), self.cfg.group_size), rewards)]

    def _completion_fields(self, row: dict, token_ids: list[int]) -> tuple[list[float], bool | None]:
        """(the completion's final-answer token mask, whether it leaks the gold answer or None)."""
        pieces = [self.tokenizer.decode([t]) for t in token_ids]
        opening = "".join(pieces[: self.cfg.leak_tokens])
        leak = distill_metrics.leaks(opening, str(row.get("problem", "")), str(row.get("answer", "")))
        return distill_metrics.answer_token_mask(pieces), leak

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        if self.tokenizer is None:
            raise RuntimeError("OPSD builds teacher prompts with the tokenizer: call attach_tokenizer first.")
        rlsd = self.cfg.mode == "rlsd"
        advantages = self._group_advantages(rollouts.rewards) if rlsd else None
        input_ids, prompt_lens, teacher_ids, teacher_lens, answer_masks, leaked, adv_rows = [], [], [], [], [], [], []
        teacher_index = []
        for g, (row, prompt, group) in enumerate(zip(rollouts.rows, rollouts.prompt_ids, rollouts.completions)):
            teacher_prompt = self._teacher_prompt(row, prompt)
            for j, c in enumerate(group):
                input_ids.append(list(prompt) + list(c.token_ids))
                prompt_lens.append(len(prompt))
                teacher_ids.append(teacher_prompt + list(c.token_ids))
                teacher_lens.append(len(teacher_prompt))
                answer_mask, leak = self._completion_fields(row, list(c.token_ids))
                teacher_index.append(float(self._teacher_index(row)) if self.teacher_paths else 0.0)
                answer_masks.append(answer_mask)
                leaked += [] if leak is None else [float(leak)]
                if rlsd:
                    adv_rows.append([advantages[g][j]] * len(c.token_ids))
        lens = [len(x) - p for x, p in zip(input_ids, prompt_lens)]
        fields = {ANSWER_MASK: answer_masks, **({contracts.ADVANTAGES: adv_rows} if rlsd else {})}
        batch = SequenceBatch(
            input_ids=input_ids,
            prompt_lens=prompt_lens,
            token_fields=fields,
            loss_normalizer=losses.step_normalizer(lens, self.loss.aggregation),
            seq_fields={TEACHER_INDEX: teacher_index} if len(self.teacher_paths) > 1 else {},
            teacher_input_ids=teacher_ids,
            teacher_prompt_lens=teacher_lens,
        )
        metrics = {"teacher_prompt_length": sum(teacher_lens) / len(teacher_lens),
                   "opsd/leak": sum(leaked) / len(leaked) if leaked else float("nan")}
        return batch, metrics

    def prepare(self, batch: SequenceBatch, learner) -> tuple[SequenceBatch, dict[str, float]]:
        """With the teacher on engines of its own: its log-prob of every sampled token in the teacher view,
        as a token field; the learner then runs no teacher forward."""
        if self.teacher_engines is None:
            return batch, {}
        requests = [ScoringRequest(ids[:n], ids[n:]) for ids, n in zip(batch.teacher_input_ids, batch.teacher_prompt_lens)]
        which = [int(i) for i in batch.seq_fields.get(TEACHER_INDEX, [0] * len(batch))]
        top_k = self.cfg.token_loss == "top_k" and self.cfg.mode == "distill"
        scored: list = [None] * len(batch)
        for index, engines in enumerate(self.teacher_engines):
            rows = [i for i, w in enumerate(which) if w == index]
            asked = [requests[i] for i in rows]
            for i, result in zip(rows, (engines.score_top_k(asked, self.cfg.top_k) if top_k else engines.score(asked))
                                 if rows else []):
                scored[i] = result
        if top_k:
            fields = {**batch.token_fields, TEACHER_LOGPROBS: [s.token_logprobs for s in scored],
                      TEACHER_TOP_IDS: [s.ids for s in scored], TEACHER_TOP_LOGPROBS: [s.logprobs for s in scored]}
        else:
            fields = {**batch.token_fields, TEACHER_LOGPROBS: scored}
        return dataclasses.replace(batch, token_fields=fields, teacher_input_ids=None, teacher_prompt_lens=None), {}

    def update(self, batch: SequenceBatch, learner) -> Update:
        """One optimizer step; the teacher-student KL estimate split into reasoning and final-answer tokens."""
        train_metrics = learner.train(batch, self.loss)
        return Update(train_metrics, split_kl(train_metrics), batch)


def split_kl(train_metrics: dict[str, float]) -> dict[str, float]:
    """opsd/kl_reasoning and opsd/kl_answer: the mean of log p_S(y) - log p_T(y) over each part's tokens
    (the learner's sums over the step); a part without tokens this step is not logged (no boxed
    answer in any completion: no final-answer tokens)."""
    out = {}
    for part in ("reasoning", "answer"):
        n = train_metrics.get(f"{part}_tokens_total", 0.0)
        if n:
            out[f"opsd/kl_{part}"] = train_metrics.get(f"kl_{part}_total", 0.0) / n
    return out
