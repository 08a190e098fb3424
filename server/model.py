"""The server model `W0 + ΔW_g`: evaluated every round, exported at the end."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fedllm.adapters import (
    Delta, LoraSettings, base_weights_of, default_target_modules, export_adapter, layouts_of, merge_into,
)
from fedllm.config import RunConfig
from fedllm.data import Example
from fedllm.models import load_model, pick_device
from fedllm.train import evaluate


class ServerModel:
    """The base model with the exact global update merged into its target weights."""

    def __init__(self, cfg: RunConfig, test: list[Example]) -> None:
        self.cfg = cfg
        self.test = test
        self.model, self.tokenizer = load_model(cfg.model, pick_device())
        self.targets = cfg.target_modules() or default_target_modules(self.model)
        self.w0 = base_weights_of(self.model, self.targets)
        self.layouts = layouts_of(self.model, self.targets)

    def shapes(self) -> dict[str, torch.Size]:
        return {module: weight.shape for module, weight in self.w0.items()}

    def evaluate(self, global_delta: Delta) -> dict[str, float]:
        """Per-task exact-match accuracy of `W0 + ΔW_g` on the held-out test split."""
        merge_into(self.model, self.w0, global_delta)
        return evaluate(self.model, self.tokenizer, self.test)

    def export(self, global_delta: Delta, out_dir: Path) -> float:
        """Save `model/` (exact, loads with AutoModelForCausalLM) and `adapter/` (rank-r peft).

        Returns the adapter's relative truncation error.
        """
        merge_into(self.model, self.w0, global_delta)
        self.model.save_pretrained(out_dir / "model")
        self.tokenizer.save_pretrained(out_dir / "model")
        base = copy.deepcopy(self.model)
        merge_into(base, self.w0, {})
        settings = LoraSettings(self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_dropout, self.targets)
        refactored = export_adapter(base, settings, global_delta, self.layouts, out_dir / "adapter", self.cfg.seed)
        self.tokenizer.save_pretrained(out_dir / "adapter")
        return refactored.relative_error
