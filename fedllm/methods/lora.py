"""LoRA and its variants rsLoRA and DoRA: the update is `ΔW = s·B·A` per target module.

- standard (Hu et al. 2021, arXiv 2106.09685): `s = alpha / r`;
- rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): `s = alpha / √r`, stable across ranks;
- DoRA (Liu et al. 2024, arXiv 2402.09353): `W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row`, the
  magnitude `m` (one entry per output feature, initially `‖W0‖_row`) is trained too. Its update
  `Δm` is merged as a tensor of its own, under `<module>.magnitude`.

The server re-factors each module's exact `ΔW_g` to the client's rank (truncated SVD). A plain
upload is the change of the factors (and magnitudes); an additive one (sparse uploads, secure
aggregation) is the model-space update itself, because factor coordinates change whenever the
server re-factors and `B'A' − BA` is not linear in what changed.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedllm.adapters import (
    PEFT_PREFIX, base_weights_of, default_target_modules, deltas_from_state, factor_key, factored_change, is_transposed,
    Refactored, Subspaces, merge_into, module_names, refactor_ranks, target_layers,
)
from fedllm.lowrank import LowRank
from fedllm.methods.base import PeftMethod, Sent, Tensors, check_keys

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

    from fedllm.config import RunConfig

VARIANTS = ("standard", "rslora", "dora")
MAGNITUDE = ".magnitude"  # suffix of a DoRA magnitude update in the model-space update


@dataclass(frozen=True)
class Layer:
    """A target layer's weight shape in its own layout, and whether that layout is transposed
    (GPT-2 `Conv1D` stores d_in × d_out; peft's factors are always (r, d_in) and (d_out, r))."""

    shape: torch.Size
    transposed: bool

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]


def magnitude_key(module: str) -> str:
    """peft's state-dict key of a DoRA magnitude vector."""
    return f"{PEFT_PREFIX}{module}.lora_magnitude_vector"


def row_norms(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """‖W‖ per output feature, as DoRA measures it."""
    return (weight.T if transposed else weight).float().norm(dim=1)


def dora_weight(w0: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`m ⊙ (W0 + ΔV) / ‖W0 + ΔV‖_row` in the layer's layout: DoRA's effective weight."""
    v = (w0 + direction).float()
    scale = magnitude / row_norms(v, transposed)
    return v * (scale[None, :] if transposed else scale[:, None])


class Lora(PeftMethod):
    """LoRA (with `lora-variant`): model-space updates per module, re-factored per client rank."""

    name = "lora"
    adapts_layers = True
    variants = VARIANTS
    default_learning_rate = 3e-3
    keeps_factors = True  # a client's update s·B'A' − s·BA can stay factored on the server

    def __init__(self, cfg: RunConfig, layers: dict[str, Layer], base_norms: Tensors | None = None) -> None:
        super().__init__(cfg)
        self.layers = layers
        self.layouts = {m: layer.transposed for m, layer in layers.items()}
        self.dora = cfg.lora_variant == "dora"
        if self.dora and base_norms is None:
            raise ValueError("DoRA needs the base weights' row norms (its initial magnitudes)")
        self.base_norms = base_norms or {}
        self.w0: Tensors = {}  # the server model's W0, kept aside by evaluation_model
        self.explicit_targets = False  # True: peft targets these modules by name, not every layer's
        # The server keeps updates and ΔW_g as factors (DoRA's magnitudes and normalisation are dense).
        self.factored = self.keeps_factors and not self.dora and cfg.factored_server()

    @classmethod
    def for_model(cls, cfg: RunConfig, model: PreTrainedModel) -> Lora:
        layers = target_layers(model, cfg.target_modules() or default_target_modules(model))
        shapes = {m: Layer(layer.weight.shape, is_transposed(layer)) for m, layer in layers.items()}
        norms = {m: row_norms(layer.weight.detach(), shapes[m].transposed) for m, layer in layers.items()}
        return cls(cfg, shapes, norms if cfg.lora_variant == "dora" else None)

    def keep_modules(self, keep: Callable[[str], bool]) -> None:
        dropped = [m for m in self.layers if not keep(m)]
        for module in dropped:
            del self.layers[module], self.layouts[module]
            self.base_norms.pop(module, None)
        self.explicit_targets = self.explicit_targets or bool(dropped)

    def largest_rank(self) -> int:
        """min(d_in, d_out) of the smallest adapted layer: a larger rank adds nothing but memory."""
        return min(min(layer.out_features, layer.in_features) for layer in self.layers.values())

    def scaling(self, rank: int) -> float:
        """`alpha / √r` for rsLoRA, else `alpha / r`, as peft computes it."""
        root = math.sqrt(rank) if self.cfg.lora_variant == "rslora" else rank
        return self.cfg.lora_alpha / root

    def peft_config(self, rank: int) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
            target_modules=sorted(self.layers) if self.explicit_targets else sorted({m.rsplit(".", 1)[-1] for m in self.layers}),
            task_type="CAUSAL_LM",
            use_rslora=self.cfg.lora_variant == "rslora", use_dora=self.dora,
        )

    # -- the update space --------------------------------------------------------------------

    def zero_update(self) -> Tensors:
        zeros = LowRank.zeros if self.factored else torch.zeros
        update = {m: zeros(layer.shape) for m, layer in self.layers.items()}
        if self.dora:
            update |= {m + MAGNITUDE: torch.zeros(layer.out_features) for m, layer in self.layers.items()}
        return update

    def model_space(self, state: Tensors, rank: int) -> Tensors:
        """The update a peft state stands for: `s·B·A` per module, and for DoRA `m − ‖W0‖_row`."""
        update = deltas_from_state(state, self.scaling(rank), self.layouts, self.factored)
        if self.dora:
            update |= {m + MAGNITUDE: state[magnitude_key(m)] - self.base_norms[m] for m in module_names(state)}
        return update

    def sent_state(self, global_update: Tensors, rank: int, seed: int) -> Sent:
        return self.sent_states(global_update, [rank], seed, Subspaces())[rank]

    def sent_states(self, global_update: Tensors, ranks: list[int], seed: int, subspaces: Subspaces) -> dict[int, Sent]:
        """Every rank's factors from one factorization of each module of ΔW_g (`refactor_ranks`)."""
        directions = {m: global_update[m] for m in self.layers}
        refactored = refactor_ranks(directions, {r: self.scaling(r) for r in ranks}, self.layouts, seed, subspaces)
        return {r: self._sent(global_update, refactored[r], r) for r in ranks}

    def _sent(self, global_update: Tensors, refactored: Refactored, rank: int) -> Sent:
        state = dict(refactored.state)
        if self.dora:
            state |= {magnitude_key(m): self.base_norms[m] + global_update[m + MAGNITUDE] for m in self.layers}
        return Sent(state, self.model_space(state, rank), refactored.relative_error, rank)

    def upload_shapes(self, sent: Sent, additive: bool) -> dict[str, torch.Size]:
        if additive:
            return {name: tensor.shape for name, tensor in sent.reference.items()}
        return super().upload_shapes(sent, additive)

    def update_from_upload(self, upload: Tensors, sent: Sent, additive: bool) -> Tensors:
        if additive:
            return self.additive_update(upload, sent.rank)
        if self.factored:
            return {m: factored_change(sent.state[factor_key(m, "B")], sent.state[factor_key(m, "A")], upload[factor_key(m, "B")],
                                       upload[factor_key(m, "A")], self.scaling(sent.rank), self.layouts[m])
                    for m in module_names(sent.state)}
        after = self.model_space({k: sent.state[k] + upload[k] for k in sent.state}, sent.rank)
        return {name: after[name] - sent.reference[name] for name in after}

    def upload(self, trained: Tensors, received: Tensors, additive: bool) -> Tensors:
        if not additive:
            return super().upload(trained, received, additive)
        rank = self.rank_of(received)
        after, before = self.model_space(trained, rank), self.model_space(received, rank)
        return {name: after[name] - before[name] for name in after}

    @staticmethod
    def rank_of(state: Tensors) -> int:
        return next(t.shape[0] for k, t in state.items() if k.endswith(".lora_A.weight"))

    # -- the server model and its exports ----------------------------------------------------

    def evaluation_model(self, base: torch.nn.Module) -> torch.nn.Module:
        self.w0 = base_weights_of(base, tuple(sorted({m.rsplit(".", 1)[-1] for m in self.layers})))
        return base

    def base_state_dict(self, model: torch.nn.Module) -> Tensors:
        """The evaluation model's state dict with the original `W0` in the target layers (it
        holds `W0 + ΔW_g` once a global update is installed)."""
        return {**model.state_dict(), **{f"{m}.weight": w0 for m, w0 in self.w0.items()}}

    def install_global(self, model: torch.nn.Module, global_update: Tensors) -> None:
        merge_into(model, self.w0, self.effective_update(global_update))

    def effective_update(self, global_update: Tensors) -> Tensors:
        """The change of each target weight: `ΔW`, or for DoRA its normalised weight minus `W0`."""
        if not self.dora:
            return {m: global_update[m] for m in self.layers}
        return {
            m: dora_weight(self.w0[m], global_update[m], self.base_norms[m] + global_update[m + MAGNITUDE],
                           self.layouts[m]) - self.w0[m]
            for m in self.layers
        }

    def export_adapter(self, model: torch.nn.Module, global_update: Tensors, out_dir: Path, seed: int) -> float:
        """The rank-`lora-rank` adapter of `ΔW_g`, with `truncation_error.json` beside it."""
        from peft import get_peft_model, set_peft_model_state_dict

        base = copy.deepcopy(model)
        merge_into(base, self.w0, {})
        sent = self.sent_state(global_update, self.cfg.lora_rank, seed)
        peft_model = get_peft_model(base, self.peft_config(self.cfg.lora_rank))
        set_peft_model_state_dict(peft_model, self.adapter_state(sent))
        peft_model.save_pretrained(out_dir)
        (Path(out_dir) / "truncation_error.json").write_text(json.dumps({
            "rank": self.cfg.lora_rank,
            "relative_frobenius_error": sent.relative_error,
            "note": "‖ΔW_g − s·B·A‖_F / ‖ΔW_g‖_F over all modules; model/ holds the exact server model",
        }, indent=2))
        return sent.relative_error

    def adapter_state(self, sent: Sent) -> Tensors:
        """The complete peft state of what was sent (FFA-LoRA adds its frozen `A`)."""
        return sent.state

    # -- the client --------------------------------------------------------------------------

    def install(self, model: PeftModel, adapter: str, received: Tensors) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = set(get_peft_model_state_dict(model, adapter_name=adapter))
        check_keys("the server's adapter state", received, expected)
        set_peft_model_state_dict(model, received, adapter_name=adapter)

    def trained(self, model: PeftModel, adapter: str) -> Tensors:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter)
        return {k: v.detach().cpu().float() for k, v in state.items()}
