"""Cooperation's run-config keys: whether client models of other families teach the server model,
on which public prompts, and how each side distils the other's answers."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.settings import ConfigError, Settings, choice, positive, setting

COOPERATIONS = ("none", "distill")


@dataclass(frozen=True)
class CooperationSettings(Settings):
    """Knowledge transfer between the server model and client models of other families (FedMKT)."""

    cooperation: str = choice(
        "cooperation", "none", COOPERATIONS,
        "clients of another client-model than the server's send their answers (top-k token distributions) "
        "on public prompts; the server distils them into its model and sends its own back (distill)",
    )
    public_dataset: str = setting(
        "public-dataset", "", lambda v: True,
        "'' (fresh prompts of the run's builtin suite), 'builtin', 'builtin:structured' or a local "
        ".json/.jsonl/.csv file (outputs ignored)",
        "cooperation: the public prompts both sides answer; never a client's private data",
    )
    public_prompts: int = setting(
        "public-prompts", 64, positive, "an integer >= 1", "cooperation: public prompts answered per round",
    )
    distill_steps: int = setting(
        "distill-steps", 20, positive, "an integer >= 1",
        "cooperation: the server's AdamW steps per round on the client models' answers (batch-size examples each)",
    )
    client_distill_steps: int = setting(
        "client-distill-steps", 10, lambda v: v >= 0, "an integer >= 0 (0: clients do not learn from the server)",
        "cooperation: each client's steps on the server model's answers before its local training",
    )
    distill_top_k: int = setting(
        "distill-top-k", 8, lambda v: 1 <= v <= 256, "an integer in [1, 256]",
        "cooperation: candidates kept per answer token (FedMKT keeps 128; traffic grows with it)",
    )
    distill_alpha: float = setting(
        "distill-alpha", 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]",
        "cooperation: weight of the teacher's answer tokens (hard labels) against its distributions (soft)",
    )
    knowledge_noise: float = setting(
        "knowledge-noise", 0.0, lambda v: v >= 0, "a number >= 0 (0: none)",
        "cooperation: std of the Gaussian noise a client adds to its log-probabilities before choosing each "
        "answer token and its top-k (blurs what its answers reveal; not a formal DP guarantee)",
    )
    distill_learning_rate: float = setting(
        "distill-learning-rate", 1e-3, positive, "a number > 0", "cooperation: AdamW learning rate of distillation",
    )

    def check(self) -> None:
        """Other models need cooperation, and cooperation needs plain LoRA rounds scored on the server."""
        others = [str(m) for m in self.client_models() if m.other is not None]
        if self.cooperation == "none":
            if others:
                raise ConfigError(f"run-config client-model {others[0]!r} is another model than the server's; "
                                  "updates of different models cannot be merged, so set cooperation = 'distill' "
                                  "(or use 'full' or 'emulator:<keep>')")
            return
        if not others:
            raise ConfigError("run-config cooperation = 'distill' needs clients of another model: set client-model "
                              "to one (e.g. 'builtin:tiny'), alone or in a list with 'full'")
        problems = {
            f"peft-method {self.peft_method!r}": self.peft_method != "lora",
            f"lora-variant {self.lora_variant!r}": self.lora_variant == "dora",
            "secure-aggregation": self.secure_aggregation,
            f"dp {self.dp!r}": self.dp != "none",
            f"baseline {self.baseline!r}": self.baseline != "none",
            f"evaluation {self.evaluation!r}": self.evaluation != "server",
            "resume": self.resume or bool(self.resume_from),
        }
        if bad := [what for what, set_ in problems.items() if set_]:
            raise ConfigError(
                f"run-config cooperation = 'distill' does not combine with {', '.join(bad)}: it takes peft-method "
                "'lora' (standard or rslora), no secure aggregation or DP (answers leave each client in the clear), "
                "no baseline, evaluation = 'server' (clients of other models cannot score the server model), and "
                "does not resume yet (the client models' states are not checkpointed)")
