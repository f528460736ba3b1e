"""transformers-generate rollout engine: slow, but runs wherever transformers does."""
from __future__ import annotations

import torch

from rl.core.types import Completion, EngineSettings, SamplingSpec, ScoringRequest, TopK
from rollouts.engine import TorchModelEngine, refuse_hints

_SCORE_BATCH = 8  # bounds the [batch, length, vocab] logits held at once


class HFEngine(TorchModelEngine):
    name = "hf"

    @classmethod
    def from_settings(cls, model_path: str, seed: int, settings: EngineSettings) -> "HFEngine":
        return cls(model_path, seed=seed, dtype=settings.dtype, max_model_len=settings.max_model_len,
                   trust_remote_code=settings.trust_remote_code)

    def __init__(
        self,
        model_path: str,
        *,
        seed: int,
        dtype: str = "float32",
        max_model_len: int = 2048,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # generate() samples from the global generator; an engine owns its process (one per actor).
        torch.manual_seed(seed)
        self.max_model_len = max_model_len
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec, hints=None) -> list[list[Completion]]:
        refuse_hints(hints)
        if not prompts:
            return []
        rows = [p for p in prompts for _ in range(spec.n)]
        self._check_lengths([len(r) for r in rows])
        width = max(map(len, rows))
        # Left padding keeps every prompt's last token in the final column, where generation starts.
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=self._generation_config(spec),
            tokenizer=self.tokenizer if spec.stop else None,
            return_dict_in_generate=True,
            output_scores=True,
        )
        new = out.sequences[:, width:]
        # `scores` are the processed logits (temperature, top-k/top-p masks) the token was drawn from.
        logprobs = torch.stack(
            [s.float().log_softmax(-1).gather(1, new[:, t : t + 1])[:, 0] for t, s in enumerate(out.scores)], 1
        )
        completions = [self._completion(r, new[i].tolist(), logprobs[i].tolist(), spec) for i, r in enumerate(rows)]
        return [completions[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]

    def set_step_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def _generation_config(self, spec: SamplingSpec):
        from transformers import GenerationConfig

        sample = spec.temperature > 0
        # The knobs are set explicitly even when they are no-ops: unset ones fall back to the
        # model's generation_config or the library's defaults (top_k=50), changing the distribution.
        return GenerationConfig(
            do_sample=sample,
            temperature=spec.temperature if sample else 1.0,
            top_p=spec.top_p if sample else 1.0,
            top_k=max(spec.top_k, 0) if sample else 0,
            repetition_penalty=1.0,
            max_new_tokens=spec.max_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            stop_strings=list(spec.stop) or None,
        )

    def _completion(self, prompt: list[int], tokens: list[int], logprobs: list[float], spec: SamplingSpec) -> Completion:
        """Cut a padded generated row where it finished and report it the way vLLM does."""
        end, reason = self._finish(tokens, spec.stop)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cuts = [text.find(s) for s in spec.stop if s in text]
        return Completion(list(prompt), tokens[:end], text[: min(cuts)] if cuts else text, logprobs[:end], reason)

    def _finish(self, tokens: list[int], stop: tuple[str, ...]) -> tuple[int, str]:
        """(number of tokens kept, finish reason); EOS is kept as the last token, like vLLM."""
        for t, tok in enumerate(tokens):
            if tok in self.eos_ids:
                return t + 1, "stop"
            if stop and any(s in self.tokenizer.decode(tokens[: t + 1], skip_special_tokens=True) for s in stop):
                return t + 1, "stop"
        return len(tokens), "length"

    @torch.no_grad()
    def score_top_k(self, requests: list[ScoringRequest], k: int) -> list[TopK]:
        result = []
        for r in requests:  # one at a time: a teacher's scoring, not the hot path of this fallback engine
            seq = r.prompt_ids + r.token_ids
            self._check_lengths([len(seq)])
            logits = self.model(input_ids=torch.tensor([seq], device=self.device)).logits[0].float()
            first = len(r.prompt_ids) - 1
            logp = logits[first : first + len(r.token_ids)].log_softmax(-1)
            top = logp.topk(k, dim=-1)
            own = logp.gather(-1, torch.tensor(r.token_ids, device=logp.device)[:, None])[:, 0]
            result.append(TopK(top.indices.tolist(), top.values.tolist(), own.tolist()))
        return result

    @torch.no_grad()
    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        seqs = [r.prompt_ids + r.token_ids for r in requests]
        self._check_lengths([len(s) for s in seqs])
        result = []
        for start in range(0, len(requests), _SCORE_BATCH):
            batch = seqs[start : start + _SCORE_BATCH]
            width = max(map(len, batch))
            # Right padding: a causal model's positions before the padding are untouched by it.
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in batch], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            token_lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            for row, r in zip(token_lp, requests[start : start + _SCORE_BATCH]):
                first = len(r.prompt_ids) - 1
                result.append(row[first : first + len(r.token_ids)].tolist())
        return result
