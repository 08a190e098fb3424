"""Upload encodings: what a client's tensors become on the wire, and back, exactly.

Two options, combinable:
- `dtype`: float32, float16 or bfloat16 for transport only; the server decodes to float32 and
  aggregates in float32. (Flower's ArrayRecord refuses bfloat16, so bfloat16 travels as its raw
  16-bit pattern in an int16 array.)
- `density` < 1: top-k sparsification per tensor (Aji & Heafield 2017; Lin et al. 2018, arXiv
  1712.01887): only the `ceil(density·n)` entries of largest magnitude are sent, as int32 indices
  and values. With error feedback, what was not sent (including rounding from `dtype`) is kept by
  the client and added to its next update, so over rounds the sum of what was sent tracks the sum
  of the true updates. Residuals must live where updates add up, i.e. in model space, never on
  LoRA factors (their coordinates change whenever the server re-factors).

`decode(encode(x))` reconstructs exactly what was sent: the server sees the same numbers the client
put on the wire, and `residual` holds exactly the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.settings import Settings, choice, setting

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_SUFFIX, VALUE_SUFFIX = "::idx", "::val"


@dataclass(frozen=True)
class UploadCodec:
    """How uploads are encoded: transport dtype and kept fraction of entries."""

    dtype: str = "float32"
    density: float = 1.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"upload dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if not 0 < self.density <= 1:
            raise ValueError(f"upload density {self.density} must be in (0, 1]")

    @property
    def sparse(self) -> bool:
        return self.density < 1


def wire_names(shapes: dict[str, torch.Size], codec: UploadCodec) -> dict[str, np.dtype]:
    """The arrays an upload of these tensors consists of, with the numpy dtype each must have."""
    values = np.dtype(np.int16 if codec.dtype == "bfloat16" else codec.dtype)
    if not codec.sparse:
        return {name: values for name in shapes}
    return {name + suffix: dtype for name in shapes for suffix, dtype in ((INDEX_SUFFIX, np.dtype(np.int32)), (VALUE_SUFFIX, values))}


def wire_entries(shapes: dict[str, torch.Size], codec: UploadCodec) -> dict[str, int]:
    """The most entries each wire array of an upload of these tensors can hold: what a receiver
    checks an array's declared shape against before decoding it."""
    if not codec.sparse:
        return {name: math.prod(shape) for name, shape in shapes.items()}
    return {name + suffix: math.prod(shape) for name, shape in shapes.items() for suffix in (INDEX_SUFFIX, VALUE_SUFFIX)}


def _to_wire(values: torch.Tensor, dtype: str) -> np.ndarray:
    cast = values.detach().to(DTYPES[dtype]).contiguous().cpu()
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy()
    return cast.numpy()


def _from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def encode(
    tensors: dict[str, torch.Tensor], codec: UploadCodec, residual: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Wire arrays for `tensors` (+ `residual` carried from earlier rounds) and the new residual."""
    wire: dict[str, np.ndarray] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        target = tensor.detach().float().flatten()
        if residual is not None and name in residual:
            target = target + residual[name].flatten()
        if codec.sparse:
            keep = max(1, math.ceil(codec.density * target.numel()))
            index = torch.topk(target.abs(), keep, sorted=False).indices.sort().values
            wire[name + INDEX_SUFFIX] = index.to(torch.int32).numpy()
            wire[name + VALUE_SUFFIX] = _to_wire(target[index], codec.dtype)
            sent = torch.zeros_like(target)
            sent[index] = _from_wire(wire[name + VALUE_SUFFIX], codec.dtype)
        else:
            wire[name] = _to_wire(target, codec.dtype).reshape(tuple(tensor.shape))
            sent = _from_wire(wire[name], codec.dtype).flatten()
        new_residual[name] = (target - sent).view_as(tensor)
    return wire, new_residual


def decode(wire: dict[str, np.ndarray], shapes: dict[str, torch.Size], codec: UploadCodec) -> dict[str, torch.Tensor]:
    """Float32 tensors of the given shapes from their wire arrays; errors name what is malformed."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if codec.sparse:
            if name + INDEX_SUFFIX not in wire or name + VALUE_SUFFIX not in wire:
                raise ValueError(f"upload is missing the sparse arrays of {name}")
            index = torch.from_numpy(np.ascontiguousarray(wire[name + INDEX_SUFFIX])).long()
            values = _from_wire(wire[name + VALUE_SUFFIX], codec.dtype)
            if index.shape != values.shape or index.numel() > numel:
                raise ValueError(f"upload of {name}: {index.numel()} indices for {values.numel()} values of {numel} entries")
            if index.numel() and (index.min() < 0 or index.max() >= numel):
                raise ValueError(f"upload of {name}: an index is outside 0..{numel - 1}")
            dense = torch.zeros(numel)
            dense[index] = values
            out[name] = dense.view(shape)
        else:
            if name not in wire:
                raise ValueError(f"upload is missing {name}")
            tensor = _from_wire(wire[name], codec.dtype)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"upload of {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            out[name] = tensor
    if extra := sorted(set(wire) - set(wire_names(shapes, codec))):
        raise ValueError(f"upload has unexpected arrays {extra[:3]}")
    return out


@dataclass(frozen=True)
class WireSettings(Settings):
    """How client uploads are encoded on the wire."""

    upload_dtype: str = choice(
        "upload-dtype", "float32", DTYPES,
        "number format of client uploads on the wire (aggregation stays float32)",
    )
    upload_sparsity: float | None = setting(
        "upload-sparsity", None, lambda v: 0 < v < 1, "'' (dense) or a density in (0, 1)",
        "clients send only this fraction of update entries (largest first), with error feedback",
    )

    def upload_codec(self) -> UploadCodec:
        return UploadCodec(self.upload_dtype, self.upload_sparsity or 1.0)
