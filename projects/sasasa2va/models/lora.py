"""LoRA on the LLM with fixed per-architecture target lists (reference §1.9, pitfalls 15-16).

The reference finds targets by scanning nn.Linear names, which for InternLM2 also catches the LM head
``output``; the lists here are explicit so the result does not depend on module discovery. The
``output`` target is opt-in (``include_internlm2_output=True``) for checkpoint fidelity. The base
model is frozen by hand (no ``prepare_model_for_kbit_training``: it upcasts a frozen 20B LLM to fp32).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "Qwen2ForCausalLM": list(_LLAMA_LIKE),
    "Qwen3ForCausalLM": list(_LLAMA_LIKE),
    "LlamaForCausalLM": list(_LLAMA_LIKE),
    "Phi3ForCausalLM": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "InternLM2ForCausalLM": ["wqkv", "wo", "w1", "w2", "w3"],
}
INTERNLM2_HEAD = "output"


def _architecture(language_model: nn.Module) -> str:
    config = getattr(language_model, "config", None)
    archs = getattr(config, "architectures", None) or [type(language_model).__name__]
    return archs[0]


def lora_targets(architecture: str, include_internlm2_output: bool = False) -> list:
    if architecture not in LORA_TARGETS:
        raise ValueError(f"no LoRA target list for {architecture!r}; known: {sorted(LORA_TARGETS)}")
    targets = list(LORA_TARGETS[architecture])
    if include_internlm2_output and architecture == "InternLM2ForCausalLM":
        targets.append(INTERNLM2_HEAD)
    return targets


def apply_lora(
    language_model: nn.Module,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    targets: Optional[Sequence[str]] = None,
    include_internlm2_output: bool = False,
) -> PeftModel:
    """Freeze the LLM and wrap it with LoRA (bias 'none', CAUSAL_LM). Raises if a target matches nothing."""
    if isinstance(language_model, PeftModel):
        raise ValueError("apply_lora: the language model already has LoRA adapters")
    targets = list(targets) if targets is not None else lora_targets(
        _architecture(language_model), include_internlm2_output
    )
    names = {name.rsplit(".", 1)[-1] for name, m in language_model.named_modules() if isinstance(m, nn.Linear)}
    absent = [t for t in targets if t not in names]
    if absent:
        raise ValueError(
            f"apply_lora: target modules {absent} not found among the Linear layers of "
            f"{type(language_model).__name__} ({sorted(names)})"
        )
    language_model.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM", target_modules=targets
    )
    return get_peft_model(language_model, config)


def lora_target_names(peft_model: PeftModel) -> set:
    """Last name component of every module that received a LoRA adapter (for checks and logs)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A")) > 0
    }


def merge_lora(language_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model (no-op without LoRA)."""
    if isinstance(language_model, PeftModel):
        return language_model.merge_and_unload()
    return language_model
