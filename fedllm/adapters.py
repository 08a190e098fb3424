"""LoRA's low-rank algebra: factors to model-space updates and back, and the target layers.

A LoRA module contributes `ΔW = s·B·A` to its base weight. Factors are not task vectors (B·A is
unchanged by B→BM, A→M⁻¹A), so fedllm aggregates `ΔW`, keeps the exact global update per module,
and re-factors it into the best rank-r approximation (truncated SVD, Eckart–Young) to send it.
Module names are those of the base model (e.g. `model.layers.0.self_attn.q_proj`); `ΔW` is float32
in the base layer's own layout (transposed for GPT-2 style `Conv1D`, whose weight is d_in × d_out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedllm import lowrank
from fedllm.lowrank import LowRank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PEFT_PREFIX = "base_model.model."
Delta = dict[str, lowrank.Update]  # module name -> ΔW, dense or factored

# Linear layers inside the transformer blocks, per architecture (attention and MLP).
TARGETS_BY_ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def weight_layer_types() -> tuple[type, ...]:
    """The layer types LoRA adapts: linear layers and GPT-2's transposed `Conv1D` (transformers is
    imported here, when a model exists, so that reading the run config stays quick)."""
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def is_transposed(layer: torch.nn.Module) -> bool:
    """Whether a layer stores its weight as d_in × d_out (GPT-2 `Conv1D`)."""
    return isinstance(layer, weight_layer_types()[1])


def default_target_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """Attention and MLP projections for known architectures, else every block linear layer."""
    known = TARGETS_BY_ARCHITECTURE.get(getattr(model.config, "model_type", ""))
    if known:
        return known
    leaves = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, weight_layer_types()) and name.rsplit(".", 1)[-1] != "lm_head"
    }
    if not leaves:
        raise ValueError(f"no linear layers found in {type(model).__name__}; set lora-target-modules")
    return tuple(sorted(leaves))


def target_layers(model: PreTrainedModel, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The base model's layers that LoRA wraps, by module name."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, weight_layer_types())
    }
    if not layers:
        raise ValueError(f"none of the target modules {list(targets)} exist in {type(model).__name__}")
    return layers


def factor_key(module: str, factor: str) -> str:
    """peft's state-dict key of one factor ('A' or 'B') of `module`'s adapter."""
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names present in a LoRA state dict, in its order."""
    suffix = ".lora_A.weight"
    return [k[len(PEFT_PREFIX): -len(suffix)] for k in state if k.endswith(suffix)]


def delta_from_factors(b: torch.Tensor, a: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """`s·B·A` in float32, in the base layer's layout."""
    delta = scaling * (b.float() @ a.float())
    return delta.T.contiguous() if transposed else delta


def factored_delta(b: torch.Tensor, a: torch.Tensor, scaling: float, transposed: bool) -> LowRank:
    """`s·B·A` kept as its factors, in the base layer's layout."""
    b, a = b.float(), a.float()  # no copies of float32 factors: the update shares their storage
    return LowRank.of(a.T, b, scale=scaling) if transposed else LowRank.of(b, a.T, scale=scaling)


def factored_change(b: torch.Tensor, a: torch.Tensor, change_b: torch.Tensor, change_a: torch.Tensor, scaling: float,
                    transposed: bool) -> LowRank:
    """`s·(B + ΔB)(A + ΔA) − s·BA = s·(B·ΔA + ΔB·A + ΔB·ΔA)` from what was sent and the upload's
    changes, as three parts that share those tensors: nothing the size of an adapter is copied, and
    the sent `B` and `A`, the same for every client, are merged once (`LowRank.combination`)."""
    parts = [(b, change_a), (change_b, a), (change_b, change_a)]
    parts = [(scaling, x.float(), y.float().T) for x, y in parts]
    return LowRank(tuple((s, right, left) if transposed else (s, left, right) for s, left, right in parts))


def deltas_from_state(state: dict[str, torch.Tensor], scaling: float, transposed: dict[str, bool],
                      factored: bool = False) -> Delta:
    """Model-space update of every module in a LoRA state dict (`factored`: as `LowRank` factors)."""
    product = factored_delta if factored else delta_from_factors
    return {m: product(state[factor_key(m, "B")], state[factor_key(m, "A")], scaling, transposed[m])
            for m in module_names(state)}


@dataclass(frozen=True)
class Refactored:
    """A rank-r LoRA state dict for a global update, with what the truncation lost."""

    state: dict[str, torch.Tensor]
    squared_error: float
    squared_norm: float

    @property
    def relative_error(self) -> float:
        """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all modules (0 for a zero update)."""
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm > 0 else 0.0


EXACT_SVD_MAX = 2048  # a module whose smaller side is at most this gets an exact SVD
OVERSAMPLING = 10  # extra directions the iteration carries beyond the largest rank sent
COLD_ITERATIONS, WARM_ITERATIONS = 4, 1  # power iterations from a random start / from last round's subspace


class Subspaces:
    """Each large dense module's leading right singular vectors at its last re-factoring: where
    the next round's subspace iteration starts (ΔW_g moves little per round). Part of the run state."""

    def __init__(self, bases: dict[str, torch.Tensor] | None = None) -> None:
        self.bases: dict[str, torch.Tensor] = dict(bases or {})

    def start(self, module: str, cols: int, width: int) -> torch.Tensor | None:
        basis = self.bases.get(module)
        return basis if basis is not None and tuple(basis.shape) == (cols, width) else None

    def keep(self, module: str, basis: torch.Tensor) -> None:
        self.bases[module] = basis.contiguous()


@dataclass(frozen=True)
class Leading:
    """A module's leading singular triplets (rows × cols layout) and the energy Σσ² beyond them."""

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    tail: float

    def truncated(self, rank: int) -> Leading:
        extra = float(self.sigma[rank:].double().pow(2).sum())
        return Leading(self.u[:, :rank], self.sigma[:rank], self.vh[:rank], self.tail + extra)


def subspace_iteration(matrix: torch.Tensor, start: torch.Tensor, iterations: int) -> tuple[torch.Tensor, ...]:
    """Leading singular triplets in the span `start` (cols × q) converges to: randomized SVD with
    power iterations, re-orthonormalised at every half-step (Halko, Martinsson & Tropp 2011,
    Algorithms 4.4 and 5.1). Started from last round's subspace, one iteration suffices."""
    v = start
    for _ in range(iterations):
        u = torch.linalg.qr(matrix @ v).Q
        v = torch.linalg.qr(matrix.T @ u).Q
    q = torch.linalg.qr(matrix @ v).Q
    small_u, sigma, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ small_u, sigma, vh


def leading_singular(matrix: lowrank.Update, rank: int, module: str, subspaces: Subspaces,
                     generator: torch.Generator, squared_norm: float) -> Leading:
    """The top-`rank` singular triplets of one module's ΔW (of squared norm `squared_norm`).

    Factored: the exact SVD of its factors, O((rows + cols)·q²). Dense and modest: an exact SVD.
    Dense and large: subspace iteration from last round's subspace (`subspaces`), or from a
    seeded random one; the tail is ‖M‖² − Σσ² in float64.
    """
    if isinstance(matrix, LowRank):
        u, sigma, v = matrix.svd()
        return Leading(u, sigma, v.T, 0.0).truncated(rank)
    matrix = matrix.float()
    if min(matrix.shape) <= EXACT_SVD_MAX:
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Leading(u, sigma, vh, 0.0).truncated(rank)
    width = min(rank + OVERSAMPLING, min(matrix.shape))
    start, iterations = subspaces.start(module, matrix.shape[1], width), WARM_ITERATIONS
    if start is None:
        start, iterations = torch.randn(matrix.shape[1], width, generator=generator).to(matrix.device), COLD_ITERATIONS
    u, sigma, vh = subspace_iteration(matrix, start, iterations)
    subspaces.keep(module, vh.T)
    tail = squared_norm - float(sigma[:rank].double().pow(2).sum())
    return Leading(u[:, :rank], sigma[:rank], vh[:rank], max(tail, 0.0))


def refactor(global_delta: Delta, rank: int, scaling: float, transposed: dict[str, bool], seed: int) -> Refactored:
    """Best rank-r factors `(B, A)` with `s·B·A ≈ ΔW` for every module (`refactor_ranks` for one rank)."""
    return refactor_ranks(global_delta, {rank: scaling}, transposed, seed, Subspaces())[rank]


def refactor_ranks(global_delta: Delta, scalings: dict[int, float], transposed: dict[str, bool], seed: int,
                   subspaces: Subspaces) -> dict[int, Refactored]:
    """Best rank-r factors `(B, A)` with `s_r·B·A ≈ ΔW` for every module and every rank r of
    `scalings`, from one factorization per module at the largest rank, split evenly (√σ each).

    Directions with no singular mass (e.g. the zero update of round 0) get a random `A` row and a
    zero `B` column, as peft initialises LoRA, so clients can train them; the product is unchanged.
    """
    ranks = sorted(scalings)
    if not ranks:  # a round that samples no node (Poisson sampling under DP) sends nothing
        return {}
    generators = {r: torch.Generator().manual_seed(seed) for r in ranks}
    iteration_start = torch.Generator().manual_seed(seed + 1)
    states: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
    errors = dict.fromkeys(ranks, 0.0)
    squared_norm = 0.0
    for module, delta in global_delta.items():
        matrix = delta.T if transposed[module] else delta
        rows, cols = matrix.shape
        energy = lowrank.squared_norm(matrix)
        top = leading_singular(matrix, ranks[-1], module, subspaces, iteration_start, energy)
        squared_norm += energy
        for r in ranks:
            leading = top.truncated(r)
            sigma = leading.sigma
            live = sigma > sigma.max().clamp_min(1e-30) * 1e-6 if len(sigma) else sigma > 0
            root = torch.sqrt(sigma * live / scalings[r])
            b = torch.zeros(rows, r)
            a = (torch.rand(r, cols, generator=generators[r]) * 2 - 1) / math.sqrt(cols)
            b[:, : len(sigma)] = leading.u * root
            a[: len(sigma)][live] = (root[:, None] * leading.vh)[live]
            states[r][factor_key(module, "A")], states[r][factor_key(module, "B")] = a, b
            errors[r] += leading.tail + float((sigma * ~live).double().pow(2).sum())
    return {r: Refactored(states[r], errors[r], squared_norm) for r in ranks}


def merge_into(model: PreTrainedModel, base_weights: dict[str, torch.Tensor], global_delta: Delta) -> None:
    """Set every target layer's weight to `W0 + ΔW` (exact server model; W0 kept aside)."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for module, w0 in base_weights.items():
            delta = global_delta.get(module)
            weight = layers[module].weight
            weight.copy_(w0 if delta is None else w0 + lowrank.dense(delta).to(weight.device, weight.dtype))


def base_weights_of(model: PreTrainedModel, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Copies of the original target weights, the `W0` the global update is added to."""
    return {name: layer.weight.detach().clone() for name, layer in target_layers(model, targets).items()}


def layouts_of(model: PreTrainedModel, targets: tuple[str, ...]) -> dict[str, bool]:
    """Whether each target layer stores its weight transposed (GPT-2 `Conv1D`)."""
    return {name: is_transposed(layer) for name, layer in target_layers(model, targets).items()}
