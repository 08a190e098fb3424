"""The PEFT method's run-config keys: which method, its adapter shape and its learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.methods import METHODS
from fedllm.settings import ConfigError, Settings, choice, anything, one_of, positive, setting


def _is_rank_list(value: str) -> bool:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return all(p.isdigit() and int(p) > 0 for p in parts)


def _is_prompt_init(value: str) -> bool:
    return value in ("", "vocab", "random") or (value.startswith("text:") and bool(value[len("text:"):].strip()))


VARIANT_NAMES = tuple(dict.fromkeys(v for method in METHODS.values() for v in method.variants))
WITH_VARIANTS = [name for name, method in METHODS.items() if len(method.variants) > 1]


@dataclass(frozen=True)
class MethodSettings(Settings):
    """What clients train (docs/methods.md); each method's own keys are refused for the others."""

    peft_method: str = choice(
        "peft-method", "lora", METHODS,
        "what clients train (docs/methods.md)",
    )
    lora_variant: str = choice(
        "lora-variant", "standard", VARIANT_NAMES,
        "lora: scaling alpha/r, alpha/√r (rsLoRA) or DoRA magnitudes; ffa-lora: standard or rslora",
    )
    num_virtual_tokens: int = setting(
        "num-virtual-tokens", 16, positive, "an integer >= 1", "prompt methods: virtual tokens in front of the input",
    )
    prompt_init: str = setting(
        "prompt-init", "", _is_prompt_init, "'' (= 'vocab'), 'vocab', 'random' or 'text:<words>'",
        "prompt-tuning: initial prompt from sampled vocabulary embeddings, at random, or from a text",
    )
    lora_rank: int = setting("lora-rank", 8, positive, "an integer >= 1", "LoRA rank r of client adapters")
    lora_alpha: float = setting("lora-alpha", 16.0, positive, "a number > 0", "LoRA alpha; scaling s = alpha / r")
    lora_dropout: float = setting("lora-dropout", 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)", "LoRA dropout")
    lora_target_modules: str = setting(
        "lora-target-modules", "", anything, "comma-separated module names, or '' for the architecture default",
        "layers that get adapters",
    )
    client_ranks: str = setting(
        "client-ranks", "", _is_rank_list, "'' or comma-separated ranks, e.g. '4,8,16'",
        "simulation: LoRA rank per partition, cycling (a node's node-config lora-rank wins)",
    )
    learning_rate: float | None = setting(
        "learning-rate", None, positive, "'' (the method's default) or a number > 0",
        "client AdamW learning rate (defaults: LoRA family 3e-3, prompt-tuning 0.3, prefix-tuning 0.1, p-tuning 0.03)",
    )

    def check(self) -> None:
        """Method keys that the chosen `peft-method` does not use are errors, not silently ignored."""
        method = METHODS[self.peft_method]
        if self.lora_variant not in method.variants:
            if len(method.variants) == 1:
                raise ConfigError(f"run-config lora-variant = {self.lora_variant!r} needs peft-method "
                                  f"{one_of(WITH_VARIANTS)} (peft-method is {self.peft_method!r})")
            raise ConfigError(f"run-config lora-variant = {self.lora_variant!r} does not combine with peft-method "
                              f"{self.peft_method!r}; it takes {' or '.join(method.variants)}")
        if self.prompt_init and not method.takes_prompt_init:
            takes = " or ".join(name for name, m in METHODS.items() if m.takes_prompt_init)
            raise ConfigError(f"run-config prompt-init applies to peft-method {takes} only "
                              f"(peft-method is {self.peft_method!r}); leave it ''")

    def client_learning_rate(self) -> float:
        """`learning-rate`, else the method's default."""
        return self.learning_rate or METHODS[self.peft_method].default_learning_rate

    def rank_for_partition(self, partition_id: int) -> int:
        """This partition's LoRA rank: `client-ranks` cycled over partitions, else `lora-rank`."""
        ranks = [int(p) for p in self.client_ranks.split(",") if p.strip()]
        return ranks[partition_id % len(ranks)] if ranks else self.lora_rank

    def target_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())
