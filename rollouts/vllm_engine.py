"""vLLM rollout engine, run in-process so that weights can be pushed as tensors."""
from __future__ import annotations

import os

from rollouts.engine import RolloutEngine, check_state_dict, refuse_hints
from rollouts.types import Completion, SamplingSpec, ScoringRequest


def _hf_layout(model_path: str, trust_remote_code: bool) -> tuple[dict[str, tuple[int, ...]], bool]:
    """(shape of every HF state-dict tensor, whether input and output embeddings are tied).

    Built on the meta device from the config alone; loading the config first also turns a bad
    model path into transformers' plain error before vLLM starts.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return shapes, tied


def _repack_lm_head(worker) -> None:
    """Rebuild the CPU backend's packed copy of `lm_head` from its (tied, just reloaded) weight.

    vLLM on CPU multiplies by a packed copy made when the layer was processed. A reload re-processes
    the layers it loaded; a tied `lm_head` that got no tensor of its own (the learner sent only
    `embed_tokens`) keeps computing with the old copy, and logprobs drift silently by ~1 nat.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(worker.model_runner.get_model().lm_head, remove_weight=False)


def _seed_sampler(worker, seed: int) -> None:
    """Reseed the generators the worker's sampler draws from (torch's global ones, on CPU and GPU
    alike: requests carry no generator of their own, since SamplingParams(seed=...) crashes on CPU)."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


class VLLMEngine(RolloutEngine):
    # Off only in tests, to show that the tied-embedding repack is what keeps logprobs right.
    repack_tied_lm_head = True

    def __init__(
        self,
        model_path: str,
        *,
        seed: int,
        dtype: str = "float32",
        max_model_len: int = 2048,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.4,
        trust_remote_code: bool = False,
    ):
        self._shapes, tied = _hf_layout(model_path, trust_remote_code)
        # Weights go in as tensors through collective_rpc, which only works with the engine core
        # in this process (across processes the tensors fail to pickle).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # This legacy variable would override kv_cache_memory_bytes in whole GiB.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        import torch
        from vllm import LLM

        on_cuda = torch.cuda.is_available()
        memory = (
            {"gpu_memory_utilization": gpu_memory_utilization}
            if on_cuda
            else {"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)}
        )
        self._needs_repack = tied and not on_cuda
        # The seed goes to the engine: SamplingParams(seed=...) with T > 0 crashes on CPU.
        self.llm = LLM(
            model=model_path,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            trust_remote_code=trust_remote_code,
            **memory,
        )
        # The first sampling call pays a one-off setup cost (~2.5 s on CPU); pay it here.
        self.generate([[0]], SamplingSpec(max_tokens=2))

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, hints=None) -> list[list[Completion]]:
        refuse_hints(hints)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            max_tokens=spec.max_tokens,
            stop=list(spec.stop) or None,
            logprobs=0,  # only the sampled token's logprob
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [
            [
                Completion(
                    prompt_ids=list(prompt),
                    token_ids=list(c.token_ids),
                    text=c.text,
                    logprobs=[step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)],
                    finish_reason=c.finish_reason,
                )
                for c in out.outputs
            ]
            for prompt, out in zip(prompts, outputs)
        ]

    def set_step_seed(self, seed: int) -> None:
        self.llm.collective_rpc(_seed_sampler, args=(seed,))

    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One greedy dummy token: prompt_logprobs need a generation step, greedy leaves the RNG alone.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        seqs = [r.prompt_ids + r.token_ids for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        return [
            [out.prompt_logprobs[t][seq[t]].logprob for t in range(len(r.prompt_ids), len(seq))]
            for r, seq, out in zip(requests, seqs, outputs)
        ]

    def update_weights(self, state_dict: dict) -> None:
        check_state_dict(state_dict, self._shapes)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
            if self._needs_repack and self.repack_tied_lm_head:
                self.llm.collective_rpc(_repack_lm_head)
        except Exception as e:
            raise RuntimeError(f"vLLM weight reload failed; this engine's weights are now undefined: {e}") from e
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
