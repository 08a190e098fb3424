"""What a PEFT method is to fedllm: a map between a peft adapter and the model-space update.

The aggregator, the client and the server model only call these hooks, so a new method is a new
subclass and nothing else changes. The contract (see DESIGN.md, "The update space"):

- the **update** is a dict of float32 tensors by name, linear where the model is (LoRA: `ΔW = s·B·A`
  per module; prompt methods: the trained tensors themselves); operators merge it key by key and
  the server keeps its exact global value `ΔW_g`;
- the server **sends** each client a peft state to continue from (`sent_state`), with `reference`,
  the update value that state stands for;
- the client **uploads** tensors in the method's own coordinates (by default: trained minus
  received), and the server turns them into the client's update `τ_k` (`update_from_upload`).
  With `additive` the coordinates must add up across clients and rounds, and the map to `τ_k`
  must be linear: sparse uploads keep their error feedback there, and secure aggregation sums
  them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

    from fedllm.adapters import Subspaces

    from fedllm.config import RunConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sent:
    """The peft state sent to clients of one rank, the update value it stands for, and how far
    that is from the exact global update (relative Frobenius error; 0 where it is exact)."""

    state: Tensors
    reference: Tensors
    relative_error: float = 0.0
    rank: int = 0  # the adapter rank the state is for (0 where ranks do not apply)


class PeftMethod(ABC):
    """One PEFT method. Subclasses set `name` and implement the abstract hooks."""

    name: ClassVar[str]
    default_learning_rate: ClassVar[float]
    uses_rank: ClassVar[bool] = True  # False: one adapter whatever a node's lora-rank
    merges_into_weights: ClassVar[bool] = True  # True: the server model is W0 + ΔW_g, exported as model/
    adapts_layers: ClassVar[bool] = False  # True: an adapter per layer (emulators train and merge layer by layer)
    variants: ClassVar[tuple[str, ...]] = ("standard",)  # the lora-variant values it takes
    takes_prompt_init: ClassVar[bool] = False  # True: prompt-init chooses its initial prompt

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.full_name: Callable[[str], str] = str  # a module's name in the full model (emulators rename)

    @classmethod
    @abstractmethod
    def for_model(cls, cfg: RunConfig, model: torch.nn.Module) -> PeftMethod:
        """The method for a base model (reads layer names and shapes; keeps no weights)."""

    def keep_modules(self, keep: Callable[[str], bool]) -> None:
        """Adapt only the modules `keep` accepts (an emulator's adapted layers); methods without
        per-module adapters have nothing to drop."""

    # -- both sides --------------------------------------------------------------------------

    @abstractmethod
    def peft_config(self, rank: int) -> PeftConfig:
        """The config a client builds its adapter from."""

    def adapter_name(self, rank: int) -> str:
        return f"rank{rank}" if self.uses_rank else "default"

    def virtual_tokens(self) -> int:
        """Positions of the model's context the method takes for itself (prompt methods' tokens)."""
        return 0

    def largest_rank(self) -> int | None:
        """The largest adapter rank this model's layers admit (None where ranks do not apply)."""
        return None

    # -- server side -------------------------------------------------------------------------

    @abstractmethod
    def zero_update(self) -> Tensors:
        """The global update before any training (all zeros, every key the operators merge)."""

    @abstractmethod
    def sent_state(self, global_update: Tensors, rank: int, seed: int) -> Sent:
        """What clients of `rank` receive to continue from `ΔW_g`."""

    def sent_states(self, global_update: Tensors, ranks: list[int], seed: int, subspaces: Subspaces) -> dict[int, Sent]:
        """What clients of each rank receive (a method whose states come from one factorization of
        `ΔW_g` shares it between ranks, and starts it from `subspaces`)."""
        return {rank: self.sent_state(global_update, rank, seed) for rank in ranks}

    def upload_shapes(self, sent: Sent, additive: bool) -> dict[str, torch.Size]:
        """Names and shapes of the tensors a client uploads (default: the trained tensors)."""
        return {name: tensor.shape for name, tensor in sent.state.items()}

    @abstractmethod
    def update_from_upload(self, upload: Tensors, sent: Sent, additive: bool) -> Tensors:
        """The client's update `τ_k` from what it uploaded."""

    def additive_update(self, upload: Tensors, rank: int) -> Tensors:
        """`τ_k` from an upload in additive coordinates: a linear map that needs only the rank, so a
        client can take it itself (secure aggregation's client step) and a sum maps through it."""
        return upload

    @abstractmethod
    def evaluation_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """The model the server evaluates and exports, built once around the base model."""

    @abstractmethod
    def install_global(self, model: torch.nn.Module, global_update: Tensors) -> None:
        """Make `evaluation_model`'s result the server model for `ΔW_g`."""

    @abstractmethod
    def export_adapter(self, model: torch.nn.Module, global_update: Tensors, out_dir: Path, seed: int) -> float:
        """Save `ΔW_g` in peft's own format (loads with `PeftModel.from_pretrained`); returns the
        relative error of what was saved against the exact server model (0 if exact)."""

    # -- client side -------------------------------------------------------------------------

    @abstractmethod
    def install(self, model: PeftModel, adapter: str, received: Tensors) -> None:
        """Load the state the server sent into the client's adapter."""

    @abstractmethod
    def trained(self, model: PeftModel, adapter: str) -> Tensors:
        """The adapter's trained tensors, under the keys the server sent."""

    def upload(self, trained: Tensors, received: Tensors, additive: bool) -> Tensors:
        """What the client sends: by default what training changed, `trained − received`."""
        return {name: trained[name] - received[name] for name in trained}


def check_keys(what: str, got: Tensors, expected: set[str]) -> None:
    """A clear error when a state's keys are not the ones this method uses."""
    if set(got) != expected:
        missing, extra = sorted(expected - set(got))[:3], sorted(set(got) - expected)[:3]
        raise ValueError(f"{what}: keys do not match this model's adapter (missing {missing}, extra {extra})")
