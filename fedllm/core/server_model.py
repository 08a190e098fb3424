"""The server model for the exact global update: evaluated every round, exported at the end."""

from __future__ import annotations

from pathlib import Path

from fedllm.config import RunConfig
from fedllm.data import Example
from fedllm.methods import Tensors, build_method
from fedllm.models import load_model, pick_device
from fedllm.data.format import Prompter
from fedllm.evaluation import Scores, context_length, score


class ServerModel:
    """The base model with the run's PEFT method and the exact global update installed."""

    def __init__(self, cfg: RunConfig, test: list[Example], name: str | None = None,
                 validation: list[Example] | None = None) -> None:
        """`name`: another model than the run's `model` (the merged model of a family of clients);
        `validation`: examples held out from training, scored besides the test split."""
        self.cfg = cfg
        self.test = test
        self.validation = validation or []
        base, self.tokenizer = load_model(name or cfg.model, pick_device())
        self.method = build_method(cfg, base)
        self.model = self.method.evaluation_model(base)
        self.prompter = Prompter(self.tokenizer, cfg.prompt_format)

    def evaluate(self, global_update: Tensors) -> Scores:
        """The server model's scores on the held-out test split."""
        self.method.install_global(self.model, global_update)
        return score(self.model, self.prompter, self.test, max_length=context_length(self.model))

    def validate(self, global_update: Tensors) -> Scores:
        """The server model's scores on the validation split (what a study tunes on)."""
        self.method.install_global(self.model, global_update)
        return score(self.model, self.prompter, self.validation, max_length=context_length(self.model))

    def export(self, global_update: Tensors, out_dir: Path) -> float:
        """Save `adapter/` (peft's format) and, where the method merges into weights, `model/`
        (exact, loads with AutoModelForCausalLM). Returns the adapter's relative error."""
        if self.method.merges_into_weights:
            self.method.install_global(self.model, global_update)
            self.model.save_pretrained(out_dir / "model")
            self.tokenizer.save_pretrained(out_dir / "model")
        error = self.method.export_adapter(self.model, global_update, out_dir / "adapter", self.cfg.seed)
        self.tokenizer.save_pretrained(out_dir / "adapter")
        return error
