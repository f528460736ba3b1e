"""The masked-diffusion rollout engine (LLaDA-style sampling) behind the RolloutEngine contract.

Log-probabilities here are the algorithm's likelihood estimator's terms (`estimator`, default
diffu-GRPO's one-step estimate, `rollouts.diffusion.one_step_logprobs` at temperature 1, every answer
position masked; others through `rollouts.estimators.rows.estimate_rows`), computed on the final
sequence, the quantity the learner computes for dLLMs: a diffusion model has no exact per-token
likelihood to report.

Sampling: LLaDA's plain sampler (`rollouts.diffusion.diffusion_sample`) unless `cache` or
`threshold` is set, then Fast-dLLM's cached/parallel sampler (`rollouts.diffusion_cached`). A LLaDA
checkpoint is loaded with our `rollouts.llada_model.LLaDAForDiffusion` when a cache is asked for (so
that it gets the cache); any other model, or no cache, goes through the usual loader (no cache).
"""
from __future__ import annotations

import torch

from rollouts.diffusion import (
    DiffusionSamplerConfig,
    answer_layout,
    check_schedule,
    diffusion_sample,
    load_masked_diffusion_model,
    mask_prompts,
    one_step_logprobs,
    resolve_mask_id,
)
from rollouts.diffusion_cached import cached_diffusion_sample
from rollouts.estimators.rows import estimate_rows
from rollouts.llada_model import LLaDAForDiffusion, is_llada_checkpoint, supports_cache
from rl.core.types import Completion, EngineSettings, SamplingSpec, ScoringRequest
from rollouts.engine import TorchModelEngine

_BATCH = 64  # rows per model call: bounds the [rows, width, vocab] logits held at once


class MaskedDiffusionEngine(TorchModelEngine):
    """answer_length: the masked span of the one-step estimator in `score` (the rollout length, as
    in the learner); generation uses each call's `spec.max_tokens`. steps None: half the answer
    length (LLaDA's default of two tokens per step). prompt_mask_prob: d1's prompt masking in the
    estimator (the algorithm's prompt_mask_prob), applied exactly as the learner's first inner update
    applies it (`rollouts.diffusion.prompt_mask`, mask_seed 0), so that the log-probs reported with
    each completion and by `score` are the quantity the learner computes."""

    name = "diffusion"
    Config = DiffusionSamplerConfig
    model_kinds = ("masked_diffusion",)
    sampling_cuts = False

    @classmethod
    def from_settings(cls, model_path: str, seed: int, settings: EngineSettings) -> "MaskedDiffusionEngine":
        s = settings
        return cls(model_path, seed=seed, dtype=s.dtype, max_model_len=s.max_model_len, trust_remote_code=s.trust_remote_code,
                   answer_length=s.answer_length, prompt_mask_prob=s.prompt_mask_prob, estimator=s.estimator,
                   estimator_samples=s.estimator_samples, **s.options)

    def __init__(
        self,
        model_path: str,
        *,
        seed: int,
        dtype: str = "float32",
        max_model_len: int = 2048,
        trust_remote_code: bool = False,
        answer_length: int = 256,
        block_length: int = 32,
        steps: int | None = None,
        remasking: str = "low_confidence",
        mask_token_id: int | None = None,
        prompt_mask_prob: float = 0.0,
        cache: str = "none",
        threshold: float | None = None,
        estimator: str = "one_step",
        estimator_samples: int = 1,
    ):
        from transformers import AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = _load_model(model_path, getattr(torch, dtype), trust_remote_code, cache).to(self.device).eval()
        self.mask_id = resolve_mask_id(self.tokenizer, mask_token_id)
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {i for i in ([self.tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])) if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_model_len = max_model_len
        self.answer_length, self.block_length, self.steps, self.remasking = answer_length, block_length, steps, remasking
        self.prompt_mask_prob = prompt_mask_prob
        self.cache, self.threshold = cache, threshold
        self.estimator, self.estimator_samples = estimator, estimator_samples
        check_schedule(answer_length, block_length, self._steps(answer_length))
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _steps(self, length: int) -> int:
        return self.steps if self.steps is not None else length // 2

    def _logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, hints: list[dict[int, int]] | None = None
    ) -> list[list[Completion]]:
        """spec.n answers per prompt; hints[i] (answer position -> token) fixes tokens of prompt i's
        answers (IGPO's inpainting). top_p/top_k/stop are not supported by this sampler."""
        if spec.temperature > 0 and (spec.top_p < 1 or spec.top_k > 0) or spec.stop:
            raise ValueError("The masked-diffusion sampler supports temperature only: set top_p=1, top_k=-1, no stop strings.")
        rows = [p for p in prompts for _ in range(spec.n)]
        row_hints = None if hints is None else [h for h in hints for _ in range(spec.n)]
        self._check_lengths([len(p) + spec.max_tokens for p in rows])
        completions: list[Completion] = []
        for start in range(0, len(rows), _BATCH):
            chunk = rows[start : start + _BATCH]
            sample, calls = self._sample(chunk, spec, None if row_hints is None else row_hints[start : start + _BATCH])
            tokens = sample.tokens.tolist()
            kept = [toks[: self._kept(toks, spec)] for toks in tokens]
            logprobs = self._estimate(chunk, sample.tokens.cpu(), spec.max_tokens, kept)
            for prompt, toks, lp, hint in zip(chunk, tokens, logprobs, sample.hint_mask.tolist()):
                completion = self._completion(prompt, toks, lp, hint if row_hints is not None else None, spec)
                completion.sampler_calls = calls
                completions.append(completion)
        return [completions[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]

    def _sample(self, chunk: list[list[int]], spec: SamplingSpec, hints):
        """(the sample, the model calls per block it took): the plain sampler, exactly as before, unless
        a cache or a threshold is set."""
        steps = self._steps(spec.max_tokens)
        kw = dict(mask_id=self.mask_id, pad_id=self.pad_id, gen_length=spec.max_tokens, block_length=self.block_length,
                  steps=steps, temperature=spec.temperature, remasking=self.remasking, generator=self.generator,
                  hints=hints)
        if self.cache == "none" and self.threshold is None:
            return diffusion_sample(self._logits, chunk, **kw), float(steps // (spec.max_tokens // self.block_length))
        model = self.model if supports_cache(self.model) else self._logits
        sample = cached_diffusion_sample(model, chunk, cache=self.cache, threshold=self.threshold, **kw)
        return sample, sum(sample.calls_per_block) / max(len(sample.calls_per_block), 1)

    def _end(self, tokens: list[int]) -> int:
        """Length kept: through the first end token (kept, as the causal engines do); the rest is EOS padding."""
        return next((t + 1 for t, tok in enumerate(tokens) if tok in self.eos_ids), len(tokens))

    def _kept(self, tokens: list[int], spec: SamplingSpec) -> int:
        """Positions kept in the completion: through the first EOS, or every answer position
        (spec.keep_after_eos, the IGPO release's loss support)."""
        return len(tokens) if spec.keep_after_eos else self._end(tokens)

    def _completion(self, prompt, tokens, logprobs, hint_mask, spec: SamplingSpec = SamplingSpec()) -> Completion:
        end, kept = self._end(tokens), self._kept(tokens, spec)
        reason = "stop" if tokens[end - 1] in self.eos_ids else "length"
        return Completion(
            list(prompt), tokens[:kept], self.tokenizer.decode(tokens[:end], skip_special_tokens=True),
            logprobs[:kept], reason, hint_mask=None if hint_mask is None else hint_mask[:kept],
        )

    def _estimate(
        self, prompts: list[list[int]], answers: torch.Tensor, length: int, completions: list[list[int]]
    ) -> list[list[float]]:
        """The estimator's terms for `answers`; `completions` (the kept tokens) seed the prompt masks
        (and, for the random estimators, are the tokens scored: the rest of the answer stays masked)."""
        if self.estimator != "one_step":
            lps = estimate_rows(lambda i, a: self._logits(i, a).cpu(), self.estimator, prompts, completions,
                                answer_length=length, pad_id=self.pad_id, mask_id=self.mask_id, n=self.estimator_samples,
                                prompt_mask_prob=self.prompt_mask_prob)
            return [lp + [0.0] * (answers.shape[1] - len(lp)) for lp in lps]
        ids, attention, positions = answer_layout(prompts, length, self.pad_id, self.mask_id)
        ids = mask_prompts(ids, prompts, completions, [0] * len(prompts), self.prompt_mask_prob, self.mask_id)
        logits = self._logits(ids, attention).cpu()
        return one_step_logprobs(logits, positions, answers[:, : positions.shape[1]]).tolist()

    def set_step_seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        """The one-step estimate of each request's tokens as the first answer tokens of an
        `answer_length`-position masked answer."""
        out = []
        for start in range(0, len(requests), _BATCH):
            chunk = requests[start : start + _BATCH]
            self._check_lengths([len(r.prompt_ids) + self.answer_length for r in chunk])
            answers = torch.full((len(chunk), self.answer_length), self.pad_id, dtype=torch.long)
            for i, r in enumerate(chunk):
                answers[i, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
            lps = self._estimate([r.prompt_ids for r in chunk], answers, self.answer_length, [list(r.token_ids) for r in chunk])
            out += [lp[: len(r.token_ids)] for lp, r in zip(lps, chunk)]
        return out


def _load_model(model_path: str, dtype: torch.dtype, trust_remote_code: bool, cache: str):
    """A LLaDA checkpoint with a cache asked for: our LLaDAForDiffusion (the release's parameter names),
    which has the cache; otherwise the usual loader (the checkpoint's own code, or a transformers MLM)."""
    if cache != "none" and is_llada_checkpoint(model_path):
        return LLaDAForDiffusion.from_pretrained(model_path, dtype=dtype)
    return load_masked_diffusion_model(model_path, dtype, trust_remote_code)
