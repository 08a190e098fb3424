"""PEFT methods by name: `peft-method` picks one; see `base.PeftMethod` for what a method says."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedllm.methods.base import PeftMethod, Sent, Tensors
from fedllm.methods.ffa_lora import FfaLora
from fedllm.methods.lora import VARIANTS, Lora
from fedllm.methods.prompt import PrefixTuning, PromptLearning, PromptTuning, PTuning

if TYPE_CHECKING:
    from fedllm.config import RunConfig
    from fedllm.emulator import LayerMap

METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (Lora, FfaLora, PromptTuning, PrefixTuning, PTuning)}


def build_method(cfg: RunConfig, model: torch.nn.Module, layer_map: LayerMap | None = None) -> PeftMethod:
    """The run's `peft-method` for this base model; for an emulator, `layer_map` gives each
    module's full-model name (what FFA-LoRA seeds its frozen `A` from) and the layers it adapts."""
    method = METHODS[cfg.peft_method].for_model(cfg, model)
    if layer_map is not None:
        method.full_name = layer_map.to_full
        method.keep_modules(lambda module: layer_map.adapts(layer_map.to_full(module)))
    return method


__all__ = [
    "METHODS", "VARIANTS", "FfaLora", "Lora", "PTuning", "PeftMethod", "PrefixTuning", "PromptLearning",
    "PromptTuning", "Sent", "Tensors", "build_method",
]
