"""Prompt-learning methods: trained virtual-token tensors in front of a frozen model.

- prompt tuning (Lester et al. 2021, arXiv 2104.08691): `num-virtual-tokens` input embeddings,
  initialised from sampled vocabulary embeddings, from a text, or at random (`prompt-init`);
- prefix tuning (Li & Liang 2021, arXiv 2101.00190): a key/value prefix for every layer;
- P-tuning (Liu et al. 2021, arXiv 2103.10385): embeddings reparameterised by an MLP encoder.

The trained tensors are peft's prompt-encoder parameters; the model-space update is their change
from the shared initial values `P0` (which the server draws once, from the run seed), so every
operator applies to them key by key. The server model is the base model with `P0 + ΔP_g` in its
prompt encoder; it cannot be merged into weights, so the export is the peft adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedllm.methods.base import PeftMethod, Sent, Tensors, check_keys

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

    from fedllm.config import RunConfig


class PromptLearning(PeftMethod):
    """What the three prompt-learning methods share; each subclass only builds its peft config."""

    uses_rank = False
    merges_into_weights = False

    def __init__(self, cfg: RunConfig, tokenizer_path: str = "") -> None:
        super().__init__(cfg)
        self.tokenizer_path = tokenizer_path
        self.initial: Tensors = {}  # P0, drawn by evaluation_model on the server

    @classmethod
    def for_model(cls, cfg: RunConfig, model: torch.nn.Module) -> PromptLearning:
        return cls(cfg, getattr(model, "name_or_path", ""))

    def virtual_tokens(self) -> int:
        return self.cfg.num_virtual_tokens

    def zero_update(self) -> Tensors:
        return {name: torch.zeros_like(tensor) for name, tensor in self.started().items()}

    def started(self) -> Tensors:
        if not self.initial:
            raise RuntimeError("the server model must be built (evaluation_model) before prompts are sent")
        return self.initial

    def sent_state(self, global_update: Tensors, rank: int, seed: int) -> Sent:
        state = {name: p0 + global_update[name] for name, p0 in self.started().items()}
        return Sent(state, {name: t.clone() for name, t in global_update.items()})

    def update_from_upload(self, upload: Tensors, sent: Sent, additive: bool) -> Tensors:
        return upload  # the upload is P' − P: already the update

    def evaluation_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """The base model wrapped with the prompt encoder; `P0` drawn from the run seed."""
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = get_peft_model(base, self.peft_config(0))
        self.initial = self.trained(model, "default")
        return model.eval()

    def install_global(self, model: torch.nn.Module, global_update: Tensors) -> None:
        self.install(model, "default", self.sent_state(global_update, 0, 0).state)

    def export_adapter(self, model: torch.nn.Module, global_update: Tensors, out_dir: Path, seed: int) -> float:
        self.install_global(model, global_update)
        model.save_pretrained(out_dir)
        return 0.0

    def install(self, model: PeftModel, adapter: str, received: Tensors) -> None:
        encoder = model.prompt_encoder[adapter]
        check_keys("the server's prompt state", received, set(encoder.state_dict()))
        encoder.load_state_dict(received)

    def trained(self, model: PeftModel, adapter: str) -> Tensors:
        return {k: v.detach().cpu().float().clone() for k, v in model.prompt_encoder[adapter].state_dict().items()}


class PromptTuning(PromptLearning):
    name = "prompt-tuning"
    takes_prompt_init = True
    default_learning_rate = 0.3

    def peft_config(self, rank: int) -> PeftConfig:
        from peft import PromptTuningConfig, PromptTuningInit

        init = self.cfg.prompt_init or "vocab"
        if init.startswith("text:"):
            return PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init[len("text:"):],
                tokenizer_name_or_path=self.tokenizer_path,
            )
        kind = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}[init]
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prompt_tuning_init=kind)


class PrefixTuning(PromptLearning):
    name = "prefix-tuning"
    default_learning_rate = 0.1

    def peft_config(self, rank: int) -> PeftConfig:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens)


class PTuning(PromptLearning):
    name = "p-tuning"
    default_learning_rate = 0.03

    def peft_config(self, rank: int) -> PeftConfig:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens)
