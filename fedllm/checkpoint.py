"""Run state after each completed round: tensors and JSON only, verified on load, the last few kept.

A checkpoint is `checkpoints/round-NNNN.safetensors`: the global update, the server optimizer's
moments, large modules' re-factoring subspaces and torch's RNG state as tensors, and in the file's metadata the round, the config, the
metrics rows and Python's RNG state as JSON, with a SHA-256 over every tensor. Neither format can
carry code, so a crafted file can at worst be refused (the pickle files of fedllm's first format,
`run_state.pt`, are never loaded). Writes are atomic; the newest `keep` files are kept so a run can
roll back to an earlier round when a later one turned out bad.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from fedllm.lowrank import Update, flatten, unflatten
from fedllm.outputs import private_folder, write_private

FOLDER = "checkpoints"
FORMAT = "fedllm-state-2"
LEGACY_FILE = "run_state.pt"  # fedllm's first format: a torch.save pickle, never loaded
_NAME = re.compile(r"^round-(\d{4,9})\.safetensors$")
_GLOBAL, _OPTIMIZER, _SUBSPACE, _TORCH_RNG = "global/", "optimizer/", "subspace/", "rng/torch"
MAX_FILE_BYTES = 64 * 2**30  # far above any run state; a larger file is not read


class CheckpointError(ValueError):
    """A run state that cannot be resumed from, and why."""


@dataclass
class RunState:
    """Everything a resumed run needs to continue exactly where a round ended.

    Client-side randomness is derived from (seed, round, partition) and needs no state; the
    server's Python and torch RNG states are kept for anything that draws from them.
    """

    round: int
    global_delta: dict[str, Update]  # dense or factored per module
    optimizer_state: dict[str, dict[str, Update]]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    config_digest: str
    rng: dict[str, Any] = field(default_factory=dict)
    subspaces: dict[str, torch.Tensor] = field(default_factory=dict)  # `adapters.Subspaces.bases`


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    if rng:
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])


def checkpoint_path(folder: Path, server_round: int) -> Path:
    return folder / FOLDER / f"round-{server_round:04d}.safetensors"


def saved_rounds(folder: Path) -> list[int]:
    """Rounds with a checkpoint file in `folder`, oldest first."""
    where = folder / FOLDER
    if not where.is_dir():
        return []
    return sorted(int(m.group(1)) for p in where.iterdir() if (m := _NAME.match(p.name)) and not p.is_symlink())


def _tensors(state: RunState) -> dict[str, torch.Tensor]:
    tensors = {_GLOBAL + name: t for name, t in flatten(state.global_delta).items()}
    for slot, moments in state.optimizer_state.items():
        tensors.update({f"{_OPTIMIZER}{slot}/{name}": t for name, t in flatten(moments).items()})
    tensors.update({_SUBSPACE + name: t for name, t in state.subspaces.items()})
    if state.rng:
        tensors[_TORCH_RNG] = state.rng["torch"]
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def save_state(folder: Path, state: RunState, keep: int = 3) -> Path:
    """Write this round's checkpoint atomically (0600 in a 0700 folder), then delete all but the
    newest `keep`."""
    tensors = _tensors(state)
    metadata = {
        "format": FORMAT, "round": str(state.round), "config": json.dumps(state.config),
        "config_digest": state.config_digest, "metrics": json.dumps(state.metrics), "sha256": _digest(tensors),
        "rng_python": json.dumps(state.rng["python"]) if state.rng else "",
    }
    target = checkpoint_path(folder, state.round)
    private_folder(target.parent)
    write_private(target, save(tensors, metadata=metadata))
    for old in saved_rounds(folder)[:-keep]:
        checkpoint_path(folder, old).unlink()
    return target


def load_state(folder: Path, config: dict[str, Any], config_digest: str, server_round: int | None = None) -> RunState:
    """Read and verify the newest checkpoint in `folder` (or that of `server_round`); refuse a
    corrupt file, one from another config, or a legacy pickle, saying why."""
    rounds = saved_rounds(folder)
    if not rounds:
        if (folder / LEGACY_FILE).exists():
            raise CheckpointError(
                f"{folder / LEGACY_FILE} is in fedllm's first checkpoint format, a pickle that can run code when "
                "loaded; fedllm no longer reads it. Start the run again without resume")
        raise CheckpointError(f"no checkpoint in {folder / FOLDER}; nothing to resume (run without resume to start fresh)")
    if server_round is not None and server_round not in rounds:
        raise CheckpointError(f"{folder / FOLDER} has no checkpoint of round {server_round}; it keeps rounds "
                              f"{', '.join(map(str, rounds))} (set resume-round to one of them, or '' for the newest)")
    path = checkpoint_path(folder, rounds[-1] if server_round is None else server_round)
    state = read_state(path)
    if state.config_digest != config_digest:
        differing = sorted(k for k in set(config) | set(state.config) if config.get(k) != state.config.get(k))
        raise CheckpointError(
            f"{path} was written by a run with a different config; differing keys: {', '.join(differing)}. "
            "Resume with the same settings (num-server-rounds and output-dir may change)"
        )
    return state


def read_state(path: Path) -> RunState:
    """One checkpoint file, every field checked for type and consistency before use."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path} is {size / 2**30:.1f} GiB, larger than any run state; not read")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({error}); it may be truncated or corrupt") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedllm run state (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its checksum does not match its contents")
    return _state_from(path, metadata, tensors)


def _field(path: Path, metadata: dict[str, str], name: str, kind: type) -> Any:
    """A metadata field decoded from JSON (or an int/str as is), of the expected type."""
    if name not in metadata:
        raise CheckpointError(f"{path} has no {name!r} in its header; it is not a complete fedllm run state")
    raw = metadata[name]
    try:
        value = int(raw) if kind is int else raw if kind is str else json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: header field {name!r} is malformed") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: header field {name!r} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _state_from(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> RunState:
    server_round = _field(path, metadata, "round", int)
    metrics = _field(path, metadata, "metrics", list)
    if not all(isinstance(row, dict) and isinstance(row.get("round"), int) for row in metrics) or \
            [row["round"] for row in metrics] != list(range(len(metrics))) or len(metrics) != server_round + 1:
        raise CheckpointError(f"{path}: its metrics rows are not rounds 0..{server_round}")
    global_delta, optimizer, rng, subspaces = {}, {}, {}, {}
    for name, tensor in tensors.items():
        if name.startswith(_GLOBAL):
            global_delta[name[len(_GLOBAL):]] = tensor
        elif name.startswith(_SUBSPACE):
            subspaces[name[len(_SUBSPACE):]] = tensor
        elif name.startswith(_OPTIMIZER) and "/" in name[len(_OPTIMIZER):]:
            slot, module = name[len(_OPTIMIZER):].split("/", 1)
            optimizer.setdefault(slot, {})[module] = tensor
        elif name == _TORCH_RNG:
            rng["torch"] = tensor
        else:
            raise CheckpointError(f"{path} holds an unexpected tensor {name!r}")
    if not global_delta or any(t.dtype != torch.float32 for t in global_delta.values()):
        raise CheckpointError(f"{path}: its global update is missing or not float32")
    if any(t.dtype != torch.float32 or t.dim() != 2 or not torch.isfinite(t).all() for t in subspaces.values()):
        raise CheckpointError(f"{path}: a re-factoring subspace is not a finite float32 matrix")
    try:
        global_delta = unflatten(global_delta)
        optimizer = {slot: unflatten(moments) for slot, moments in optimizer.items()}
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if python_rng := metadata.get("rng_python"):
        rng["python"] = _python_rng(path, python_rng)
    if set(rng) not in ({"python", "torch"}, set()):
        raise CheckpointError(f"{path}: its RNG state is incomplete")
    if "torch" in rng and (rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape):
        raise CheckpointError(f"{path}: its torch RNG state is malformed")
    return RunState(server_round, global_delta, optimizer, metrics, _field(path, metadata, "config", dict),
                    _field(path, metadata, "config_digest", str), rng, subspaces)


def _python_rng(path: Path, raw: str) -> tuple:
    """`random.getstate()` from its JSON form, checked so `random.setstate` cannot fail later."""
    try:
        version, internal, gauss = json.loads(raw)
        state = (version, tuple(internal), gauss)
        random.Random().setstate(state)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise CheckpointError(f"{path}: its Python RNG state is malformed") from None
    return state
