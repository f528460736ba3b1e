"""LoRA: peft adapters on the policy, and the merged weights W + (alpha/r) B @ A the engines load."""
from __future__ import annotations

import torch

from rl.config import LoraConfig

ADAPTER = "default"  # peft's name for the one adapter


def with_lora(model: torch.nn.Module, lora: LoraConfig, causal: bool = True) -> torch.nn.Module:
    """The model with trainable peft adapters on `lora.target_modules`; everything else frozen.
    A masked-diffusion model gets peft's plain wrapper: the causal-LM one expects generate()."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM" if causal else None,
    )
    return peft.get_peft_model(model, config)


def merged_lora_state(causal_lm: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-injected model's state (HF-relative names) -> the plain HF model's: W + (alpha/r) B @ A
    for every adapted layer, `base_layer.` dropped from the names, no adapter tensors."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, layer in causal_lm.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
            delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
            weight = state[f"{name}.base_layer.weight"]
            # Merged in float32, so that a bf16 model rounds once, not at the product and again at the sum.
            delta = delta.T if layer.fan_in_fan_out else delta
            merged[f"{name}.base_layer.weight"] = (weight.float() + delta).to(weight.dtype)
    return {
        key.replace(".base_layer.", "."): merged.get(key, value)
        for key, value in state.items()
        if ".lora_" not in key
    }

