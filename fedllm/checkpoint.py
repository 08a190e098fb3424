"""Run state after each completed round: written atomically, verified on load.

File layout: `FEDLLM-STATE v1\\n`, one JSON header line (payload length, SHA-256, config), then a
`torch.save` payload. A write goes to a temporary file that is fsynced and renamed over the old
one, so a crash mid-write leaves the previous good state in place; a truncated or altered file
fails its checksum and is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MAGIC = b"FEDLLM-STATE v1\n"
STATE_FILE = "run_state.pt"


class CheckpointError(ValueError):
    """A run state that cannot be resumed from, and why."""


@dataclass
class RunState:
    """Everything a resumed run needs to continue exactly where the last round ended.

    Client-side randomness is derived from (seed, round, partition) and needs no state; the
    server's Python and torch RNG states are kept for anything that draws from them.
    """

    round: int
    global_delta: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    config_digest: str
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    if rng:
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])


def save_state(folder: Path, state: RunState) -> Path:
    """Write `folder/run_state.pt` atomically (temp file, fsync, rename, fsync the folder)."""
    buffer = io.BytesIO()
    torch.save({"round": state.round, "global_delta": state.global_delta, "optimizer_state": state.optimizer_state,
                "metrics": state.metrics, "rng": state.rng}, buffer)
    payload = buffer.getvalue()
    header = {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "round": state.round,
              "config": state.config, "config_digest": state.config_digest}
    target = folder / STATE_FILE
    temporary = folder / (STATE_FILE + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(MAGIC + json.dumps(header).encode() + b"\n" + payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def load_state(folder: Path, config: dict[str, Any], config_digest: str) -> RunState:
    """Read and verify `folder/run_state.pt`; refuse a corrupt file or one from another config."""
    path = folder / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"no run state at {path}; nothing to resume (run without resume to start fresh)")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a fedllm run state (bad header); it may be corrupt")
    header_line, _, payload = raw[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} has a corrupt header ({error})") from None
    if len(payload) != header["length"]:
        raise CheckpointError(f"{path} is truncated: {len(payload)} of {header['length']} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its checksum does not match its contents")
    if header["config_digest"] != config_digest:
        differing = sorted(k for k in set(config) | set(header["config"]) if config.get(k) != header["config"].get(k))
        raise CheckpointError(
            f"{path} was written by a run with a different config; differing keys: {', '.join(differing)}. "
            "Resume with the same settings (num-server-rounds and output-dir may change)"
        )
    data = torch.load(io.BytesIO(payload), weights_only=False)
    return RunState(data["round"], data["global_delta"], data["optimizer_state"], data["metrics"],
                    header["config"], header["config_digest"], data["rng"])
