"""FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): `A` frozen at a seed every party shares, only `B`
trained and sent.

With `A` fixed, `ΔW = s·B·A` is linear in what clients send: the merge of the `s·ΔB_k·A` is what
any linear operator would give on the `ΔB_k`, and secure aggregation can sum the `ΔB_k` directly.
The upload is `B`'s change only (d_out × r per module, against LoRA's (d_in + d_out) × r).

To send the global update the server projects `ΔW_g` onto the row space of `A`:
`B = ΔW_g·Aᵀ(A·Aᵀ)⁻¹ / s`, exact whenever the operator is linear and reported otherwise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fedllm.adapters import factor_key
from fedllm.methods.base import PeftMethod, Sent, Tensors
from fedllm.methods.lora import Lora
from fedllm.seeds import frozen_a_seed

if TYPE_CHECKING:
    from peft import PeftModel


class FfaLora(Lora):
    """LoRA with a shared frozen `A`; the update and the upload are linear in `B`."""

    name = "ffa-lora"
    variants = ("standard", "rslora")  # DoRA's magnitudes would make the update non-linear in B
    keeps_factors = False  # its updates are dense sums of B's coordinates

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - Lora's own arguments
        super().__init__(*args, **kwargs)
        self._frozen: dict[tuple[str, int], torch.Tensor] = {}

    def frozen_a(self, module: str, rank: int) -> torch.Tensor:
        """The module's `A` (r × d_in), drawn from the run seed like peft's LoRA init
        (uniform in ±1/√d_in): the same on every client and on the server. Rows are drawn one
        after another, so a lower rank's `A` is the first rows of a higher rank's and their
        row spaces nest (clients of different ranks update a common subspace)."""
        if (module, rank) not in self._frozen:  # drawn once: every reply of every round uses it
            d_in = self.layers[module].in_features
            generator = torch.Generator().manual_seed(frozen_a_seed(self.cfg.seed, self.full_name(module)))
            rows = [torch.rand(d_in, generator=generator) for _ in range(rank)]
            self._frozen[(module, rank)] = (torch.stack(rows) * 2 - 1) / math.sqrt(d_in)
        return self._frozen[(module, rank)]

    def frozen_state(self, rank: int) -> Tensors:
        return {factor_key(m, "A"): self.frozen_a(m, rank) for m in self.layers}

    def in_layout(self, module: str, out_in: torch.Tensor) -> torch.Tensor:
        return out_in.T.contiguous() if self.layouts[module] else out_in

    sent_states = PeftMethod.sent_states  # a projection per rank, not one factorization shared by all

    def sent_state(self, global_update: Tensors, rank: int, seed: int) -> Sent:
        """`B` per module: the least-squares projection of `ΔW_g` onto the row space of `A`."""
        scaling = self.scaling(rank)
        state, reference = {}, {}
        squared_error = squared_norm = 0.0
        for module in self.layers:
            a = self.frozen_a(module, rank).double()
            delta = global_update[module].double()
            out_in = delta.T if self.layouts[module] else delta
            b = torch.linalg.solve(a @ a.T, a @ out_in.T).T / scaling
            state[factor_key(module, "B")] = b.float()
            reference[module] = self.in_layout(module, (scaling * b @ a).float())
            squared_error += float((out_in - scaling * b @ a).pow(2).sum())
            squared_norm += float(out_in.pow(2).sum())
        error = math.sqrt(squared_error / squared_norm) if squared_norm > 0 else 0.0
        return Sent(state, reference, error, rank)

    def upload_shapes(self, sent: Sent, additive: bool) -> dict[str, torch.Size]:
        return PeftMethod.upload_shapes(self, sent, additive)  # ΔB, plain or additive alike

    def update_from_upload(self, upload: Tensors, sent: Sent, additive: bool) -> Tensors:
        return self.additive_update(upload, sent.rank)  # ΔB is additive either way

    def additive_update(self, upload: Tensors, rank: int) -> Tensors:
        """`τ_k = s·ΔB_k·A` per module."""
        scaling = self.scaling(rank)
        return {
            m: self.in_layout(m, scaling * upload[factor_key(m, "B")] @ self.frozen_a(m, rank))
            for m in self.layers if factor_key(m, "B") in upload  # an emulator client uploads its layers only
        }

    def upload(self, trained: Tensors, received: Tensors, additive: bool) -> Tensors:
        return PeftMethod.upload(self, trained, received, additive)  # ΔB: linear, so it adds up

    def adapter_state(self, sent: Sent) -> Tensors:
        return {**sent.state, **self.frozen_state(sent.rank)}

    def install(self, model: PeftModel, adapter: str, received: Tensors) -> None:
        """`B` from the server, the shared `A` from the seed; `A` stays frozen while training."""
        rank = next(iter(received.values())).shape[1]
        super().install(model, adapter, {**received, **self.frozen_state(rank)})
        for name, parameter in model.named_parameters():
            if f".lora_A.{adapter}." in name:
                parameter.requires_grad_(False)

    def trained(self, model: PeftModel, adapter: str) -> Tensors:
        return {k: v for k, v in super().trained(model, adapter).items() if ".lora_B." in k}
