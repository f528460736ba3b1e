"""vLLM rollout engine: in-process and eager on CPU (weights pushed as tensors), with its own
worker processes and CUDA graphs on GPU (weights pushed through a file, shared memory or the collective group)."""
from __future__ import annotations

import os

from rl.core.types import Completion, EngineSettings, SamplingSpec, ScoringRequest, TopK
from rollouts.engine import RolloutEngine, check_state_dict, named_items, refuse_hints


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


def _in_worker(worker, fn, args):
    """fn(WeightWorker, *args) inside one of vLLM's workers: its loader is the in-place reload (which
    consumes an iterator as it comes), its state a dict kept on the worker."""
    from rollouts.engine import WeightWorker

    state = worker.__dict__.setdefault("rl_weight_state", {})
    load = lambda named: worker.reload_weights(weights_iterator=iter(named))  # noqa: E731
    return fn(WeightWorker(load, worker.rank, worker.device, state), *args)


class VLLMEngine(RolloutEngine):
    name = "vllm"
    can_sleep = True

    @classmethod
    def from_settings(cls, model_path: str, seed: int, settings: EngineSettings) -> "VLLMEngine":
        s = settings
        return cls(model_path, seed=seed, dtype=s.dtype, max_model_len=s.max_model_len, kv_cache_gb=s.kv_cache_gb,
                   gpu_memory_utilization=s.gpu_memory_utilization, trust_remote_code=s.trust_remote_code,
                   sleep_mode=s.sleep_mode, tensor_parallel_size=s.tensor_parallel_size)

    def __init__(
        self,
        model_path: str,
        *,
        seed: int,
        dtype: str = "float32",
        max_model_len: int = 2048,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float | None = None,
        trust_remote_code: bool = False,
        sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
    ):
        """gpu_memory_utilization: vLLM's share of each GPU (None: 0.85, an engine alone on its GPUs).
        sleep_mode: on GPU, allow sleep()/wake_up() (colocated with learners). Both ignored on CPU."""
        self._shapes, tied = _hf_layout(model_path, trust_remote_code)
        # This legacy variable would override kv_cache_memory_bytes in whole GiB.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        import torch

        self.on_cuda = torch.cuda.is_available()
        # On CPU, weights go in as tensors through collective_rpc, which only works with the engine
        # core in this process (across processes the tensors fail to pickle); CUDA graphs do not
        # exist there. On GPU, vLLM's own worker processes and CUDA graphs are much faster, and
        # weights go through a file or the collective group; functions sent to the workers
        # (seeding, the weight group) need vLLM's pickle-based serialization.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.on_cuda else "0"
        if self.on_cuda:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        memory = (
            dict(
                gpu_memory_utilization=gpu_memory_utilization or 0.85,
                enable_sleep_mode=sleep_mode,
                tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="mp",
            )
            if self.on_cuda
            else {"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)}
        )
        if not self.on_cuda and hasattr(torch.cpu, "_init_amx"):
            # On CPUs with AMX, vLLM's bf16 attention uses AMX tiles, which Linux grants only to a
            # process that asked (arch_prctl); without the request the engine dies of SIGILL.
            torch.cpu._init_amx()
        self.sleep_mode = sleep_mode and self.on_cuda
        self._needs_repack = tied and not self.on_cuda
        # The seed goes to the engine: SamplingParams(seed=...) with T > 0 crashes on CPU.
        self.llm = LLM(
            model=model_path,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=not self.on_cuda,
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

    def score_top_k(self, requests: list[ScoringRequest], k: int) -> list[TopK]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=k gives, at each position, the k most likely tokens and the actual one.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        seqs = [r.prompt_ids + r.token_ids for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        result = []
        for r, seq, out in zip(requests, seqs, outputs):
            positions = [out.prompt_logprobs[t] for t in range(len(r.prompt_ids), len(seq))]
            # The k most likely by log-prob: ranks can tie, so that k + 1 entries (the token itself
            # among them) may claim a rank <= k.
            tops = [sorted(((-lp.logprob, tok) for tok, lp in at.items()))[:k] for at in positions]
            result.append(TopK([[tok for _, tok in top] for top in tops], [[-neg for neg, _ in top] for top in tops],
                               [at[tok].logprob for at, tok in zip(positions, r.token_ids)]))
        return result

    def load_weights(self, named_tensors) -> None:
        state = dict(named_items(named_tensors))
        check_state_dict(state, self._shapes)
        try:
            if self.on_cuda:
                # Tensors do not pickle into vLLM's worker processes: through a file in shared memory.
                import tempfile

                from safetensors.torch import save_file

                with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
                    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
            else:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
            self._after_reload()
        except Exception as e:
            raise RuntimeError(f"vLLM weight reload failed; this engine's weights are now undefined: {e}") from e

    def weight_workers(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def in_weight_workers(self, fn, *args) -> list:
        # Each tensor-parallel worker takes part (group rank, buffers on its device); vLLM's loaders
        # keep each worker's shard of the full tensors it receives.
        try:
            results = self.llm.collective_rpc(_in_worker, args=(fn, args))
            self._after_reload()
        except Exception as e:
            raise RuntimeError(f"vLLM weight reload failed; this engine's weights are now undefined: {e}") from e
        return results

    def _after_reload(self) -> None:
        if self._needs_repack:
            self.llm.collective_rpc(_repack_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU for the learners: level 1 offloads the weights to CPU memory and drops the KV
        cache (level 2 would drop the weights, which a partial push, as with LoRA, cannot refill).
        A no-op without sleep mode (CPU, or split placement)."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
