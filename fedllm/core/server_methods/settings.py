"""The server-side method's run-config key: federated fine-tuning, or a reference run (`baseline`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.core.server_methods import SERVER_METHODS
from fedllm.settings import ConfigError, Settings, choice


@dataclass(frozen=True)
class ServerMethodSettings(Settings):
    """Which server-side method runs; the references are non-private by design."""

    baseline: str = choice(
        "baseline", "none", SERVER_METHODS,
        "reference runs: one client trains on all partitions pooled, for as many steps as a round's clients "
        "together (centralized), or every client trains alone and is scored on the test split (local-only)",
    )

    def check(self) -> None:
        """Baselines are non-private references: privacy mechanisms would only blur them."""
        if self.baseline != "none" and (self.secure_aggregation or self.dp != "none"):
            raise ConfigError(f"run-config baseline = {self.baseline!r} is a non-private reference; "
                              "set secure-aggregation = false and dp = 'none' for it")
