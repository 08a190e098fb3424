"""Server optimizers on the merged model-space update (FedAvgM, FedOpt).

The merged update Δ_t = merge(τ_1..τ_K) is a pseudo-gradient in model space, where per-entry
operations are meaningful (unlike on LoRA factors). The step that is added to ΔW_g:

- `none`:     Δ_t
- `momentum`: u_t = μ·u_{t−1} + Δ_t;  step = η·u_t                     (FedAvgM, Hsu et al. 2019, arXiv 1909.06335)
- `adagrad`:  v_t = v_{t−1} + Δ_t²
- `yogi`:     v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²)
- `adam`:     v_t = β2·v_{t−1} + (1−β2)·Δ_t²
  with m_t = β1·m_{t−1} + (1−β1)·Δ_t and step = η·m_t / (√v_t + τ)     (Reddi et al. 2021, arXiv 2003.00295, Alg. 2)

As in the paper: no bias correction, v starts at τ². The adaptive steps move each entry by about η
per round, so η must be on the scale of the update's entries (e.g. 1e-3), not 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedllm.lowrank import compacted, dense
from fedllm.settings import Settings, positive, setting

OPTIMIZERS = ("none", "momentum", "adagrad", "yogi", "adam")
State = dict[str, dict[str, torch.Tensor]]  # moment name ("m", "v", "u") -> module -> tensor


@dataclass(frozen=True)
class ServerOptimizer:
    """Which server step to take and its hyper-parameters."""

    name: str = "none"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"server optimizer {self.name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")

    def step(self, update: dict[str, torch.Tensor], state: State) -> tuple[dict[str, torch.Tensor], State]:
        """The step to add to ΔW_g for this round's merged `update`, and the new state."""
        if self.name == "none":
            return dict(update), state
        if self.name == "momentum":
            velocity = {m: compacted(self.momentum * state.get("u", {}).get(m, 0) + d) for m, d in update.items()}
            return {m: self.learning_rate * u for m, u in velocity.items()}, {"u": velocity}
        update = {m: dense(d) for m, d in update.items()}  # entry-wise moments need entries
        first = {m: self.beta1 * state.get("m", {}).get(m, 0) + (1 - self.beta1) * d for m, d in update.items()}
        second = {m: self._second_moment(state.get("v", {}).get(m), d) for m, d in update.items()}
        step = {m: self.learning_rate * first[m] / (second[m].sqrt() + self.tau) for m in update}
        return step, {"m": first, "v": second}

    def _second_moment(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        v = torch.full_like(delta, self.tau**2) if previous is None else previous
        squared = delta * delta
        if self.name == "adagrad":
            return v + squared
        if self.name == "yogi":
            return v - (1 - self.beta2) * squared * torch.sign(v - squared)
        return self.beta2 * v + (1 - self.beta2) * squared


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """The server step taken on the merged update (FedAvgM / FedOpt)."""

    server_optimizer: str = setting(
        "server-optimizer", "none", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}", "step applied to the merged update (FedAvgM / FedOpt)",
    )
    server_learning_rate: float = setting(
        "server-learning-rate", 1.0, positive, "a number > 0", "server step size η (adaptive optimizers: ~1e-3)"
    )
    server_momentum: float = setting("server-momentum", 0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", "momentum: μ")
    server_beta1: float = setting("server-beta1", 0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", "adagrad/yogi/adam: β1")
    server_beta2: float = setting("server-beta2", 0.99, lambda v: 0 <= v < 1, "a number in [0, 1)", "yogi/adam: β2")
    server_tau: float = setting("server-tau", 1e-3, positive, "a number > 0", "adagrad/yogi/adam: τ")

    def server_optimizer_settings(self) -> ServerOptimizer:
        return ServerOptimizer(self.server_optimizer, self.server_learning_rate, self.server_momentum,
                               self.server_beta1, self.server_beta2, self.server_tau)
