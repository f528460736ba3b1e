"""Weight export and run-state checkpoints of one rank: the HF weights the engines load and
`save_hf` writes (merged with LoRA), and DeepSpeed's checkpoint with the RNG and EMA state."""
from __future__ import annotations

import os

import torch

from rl.learner.frozen import FrozenModels
from rl.learner.lora import ADAPTER, merged_lora_state
from rl.learner.model import causal_lm
from rl.core.rng import rng_state, set_rng_state

DEEPSPEED_TAG = "deepspeed"  # save_checkpoint's subfolder for DeepSpeed's own files
EMA_FILE = "ema_teacher.pt"


class StateExport:
    """Reads (and restores) the state of `engine` (the policy's DeepSpeed engine) and `frozen`'s EMA
    teacher on rank `rank`; every method is a collective call over the learner ranks."""

    def __init__(self, engine, frozen: FrozenModels, rank: int, lora: bool, model_path: str):
        self.engine, self.frozen, self.rank, self.lora, self.model_path = engine, frozen, rank, lora, model_path

    def engine_weights(self):
        """(HF name, full tensor) for each weight the engines must load, one at a time; a collective
        call under ZeRO-3. Each tensor is valid only until the next is asked for.

        Without LoRA: every parameter once (a tied output layer is the input embedding, sent once
        under its first name, as `named_parameters` gives it). With LoRA: only the adapted layers'
        merged weights W + (alpha/r) B A, in float32 then rounded once, as in `merged_lora_state`.
        """
        import deepspeed

        lm = causal_lm(self.engine.module.lm)
        if not self.lora:
            for name, p in lm.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.detach()
            return
        from peft.tuners.lora import LoraLayer

        for name, layer in lm.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            weight, a, b = layer.base_layer.weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            with deepspeed.zero.GatheredParameters([weight, a, b], modifier_rank=None):
                delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
                delta = delta.T if layer.fan_in_fan_out else delta
                yield f"{name}.weight", (weight.float() + delta).to(weight.dtype)

    def checkpoint_bytes(self) -> int:
        """What a checkpoint holds of the learner, from the state itself (every rank sees every
        parameter's full size): each trained parameter in its dtype, plus AdamW's float32 master copy
        and two float32 moments (12 bytes a parameter), plus the EMA teacher's float32 copy."""
        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        numel = [getattr(p, "ds_numel", None) or p.numel() for p in trained]  # ZeRO-3 partitions report ds_numel
        total = sum(n * (p.element_size() + 12) for n, p in zip(numel, trained))
        if getattr(self.frozen, "ema", None) is not None:
            total += 4 * sum(numel)
        return total

    def _gather_cpu(self) -> dict[int, torch.Tensor]:
        """Every policy parameter as a CPU tensor on rank 0, by id ({} elsewhere); a collective call.

        One parameter at a time, so that ZeRO-3 never holds the whole model on the accelerator.
        """
        import deepspeed

        gathered: dict[int, torch.Tensor] = {}
        for p in self.engine.module.parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    gathered[id(p)] = p.detach().to("cpu", copy=True)
        return gathered

    @staticmethod
    def _state_on_cpu(module: torch.nn.Module, gathered: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Tied weights stay one shared tensor under both names, as in module.state_dict().
        return {
            name: gathered[id(t)] if id(t) in gathered else t.detach().to("cpu", copy=True)
            for name, t in module.state_dict(keep_vars=True).items()
        }

    def _hf_state(self, gathered: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        lm = causal_lm(self.engine.module.lm)
        state = self._state_on_cpu(lm, gathered)
        return merged_lora_state(lm, state) if self.lora else state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's full state dict as CPU tensors on rank 0 ({} elsewhere); a collective call.

        With LoRA: the merged weights W + (alpha/r) B @ A under the base model's HF names, what
        the engines load.
        """
        gathered = self._gather_cpu()
        return self._hf_state(gathered) if self.rank == 0 else {}

    def save_hf(self, out_dir: str, adapter: bool = False) -> None:
        """Write an HF folder (config, safetensors, tokenizer; with LoRA the merged model) on rank 0,
        and with `adapter=True` the peft adapter alone in out_dir/adapter; a collective call."""
        from transformers import AutoTokenizer

        if adapter and not self.lora:
            raise ValueError("save_hf(adapter=True) needs model.lora.enabled.")
        gathered = self._gather_cpu()
        if self.rank != 0:
            return
        lm = self.engine.module.lm
        causal_lm(lm).save_pretrained(out_dir, state_dict=self._hf_state(gathered))
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)
        if adapter:
            lm.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=self._state_on_cpu(lm, gathered))

    # ------------------------------------------------------------------ run-state checkpoints

    def save_checkpoint(self, out_dir: str) -> None:
        """This rank's training state into out_dir (shared by all ranks); a collective call.

        DeepSpeed's checkpoint (weights, optimizer, lr schedule; with LoRA only the adapters: the
        frozen base is the model's own), this rank's RNG states, and the EMA teacher's moving weights.
        """
        self.engine.save_checkpoint(out_dir, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{self.rank}.pt"))
        if self.frozen.ema is not None:
            ema = self.frozen.ema_state()
            if self.rank == 0:
                torch.save(ema, os.path.join(out_dir, EMA_FILE))

    def load_checkpoint(self, in_dir: str) -> None:
        """Restore what save_checkpoint wrote, on ranks built as the saving ones; a collective call."""
        path, _ = self.engine.load_checkpoint(in_dir, tag=DEEPSPEED_TAG, load_module_strict=not self.lora)
        if path is None:
            raise FileNotFoundError(f"No DeepSpeed checkpoint in {os.path.join(in_dir, DEEPSPEED_TAG)}.")
        set_rng_state(torch.load(os.path.join(in_dir, f"rng_rank{self.rank}.pt"), weights_only=False))
        if self.frozen.ema is not None:
            self.frozen.load_ema(torch.load(os.path.join(in_dir, EMA_FILE)))

