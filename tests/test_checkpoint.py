"""Run state: tensors and JSON only, atomic writes, verified loads, the last few kept, and
refusals that say what is wrong."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fedllm.checkpoint import (
    FOLDER, LEGACY_FILE, CheckpointError, RunState, _digest, capture_rng, checkpoint_path, load_state, read_state,
    save_state, saved_rounds,
)
from fedllm.config import RunConfig
from fedllm.core.aggregator import Aggregator
from fedllm.core.nodes import NodeInfo
from fedllm.methods.lora import Layer, Lora


def state(round_: int, cfg: RunConfig) -> RunState:
    generator = torch.Generator().manual_seed(round_)
    return RunState(
        round=round_,
        global_delta={"layer.q_proj": torch.randn(6, 4, generator=generator)},
        optimizer_state={"u": {"layer.q_proj": torch.randn(6, 4, generator=generator)}},
        metrics=[{"round": r, "accuracy": r / 10} for r in range(round_ + 1)],
        config=cfg.as_dict(), config_digest=cfg.digest(), rng=capture_rng(),
        subspaces={"layer.q_proj": torch.randn(4, 3, generator=generator)},
    )


def test_round_trip_restores_every_tensor_row_and_rng_state(tmp_path):
    cfg = RunConfig()
    original = state(3, cfg)
    save_state(tmp_path, original)
    loaded = load_state(tmp_path, cfg.as_dict(), cfg.digest())
    assert loaded.round == 3 and loaded.metrics == original.metrics
    assert torch.equal(loaded.global_delta["layer.q_proj"], original.global_delta["layer.q_proj"])
    assert torch.equal(loaded.optimizer_state["u"]["layer.q_proj"], original.optimizer_state["u"]["layer.q_proj"])
    assert torch.equal(loaded.subspaces["layer.q_proj"], original.subspaces["layer.q_proj"])
    assert loaded.rng["python"] == original.rng["python"] and torch.equal(loaded.rng["torch"], original.rng["torch"])


def test_the_newest_rounds_are_kept_and_any_kept_round_can_be_resumed(tmp_path):
    cfg = RunConfig()
    for r in range(6):
        save_state(tmp_path, state(r, cfg), keep=3)
    assert saved_rounds(tmp_path) == [3, 4, 5]
    assert load_state(tmp_path, cfg.as_dict(), cfg.digest()).round == 5
    assert load_state(tmp_path, cfg.as_dict(), cfg.digest(), server_round=3).round == 3
    with pytest.raises(CheckpointError, match=r"no checkpoint of round 1; it keeps rounds 3, 4, 5"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest(), server_round=1)
    assert not list((tmp_path / FOLDER).glob("*.tmp")), "no temporary file is left behind"


def test_checkpoints_are_private_to_their_owner(tmp_path):
    path = save_state(tmp_path / "run", state(1, RunConfig()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_truncated_and_altered_files_are_refused_and_left_in_place(tmp_path):
    cfg = RunConfig()
    path = save_state(tmp_path, state(2, cfg))
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    altered = bytearray(good)
    altered[-50] ^= 0xFF  # a byte of tensor data
    path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    assert path.read_bytes() == bytes(altered), "a refused file is never overwritten by loading"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())


class _RunsCommand:
    """A pickle payload that runs a shell command when unpickled (what an attacker would plant)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_checkpoint_is_refused_without_running_its_code(tmp_path):
    """The first row of the hostile-input table: fedllm's first format with a valid checksum and
    config digest around a payload that runs a command."""
    cfg, marker = RunConfig(), tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"round": 1, "payload": _RunsCommand(marker)}, buffer)
    payload = buffer.getvalue()
    header = {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "round": 1,
              "config": cfg.as_dict(), "config_digest": cfg.digest()}
    (tmp_path / LEGACY_FILE).write_bytes(b"FEDLLM-STATE v1\n" + json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="pickle that can run code when loaded; fedllm no longer reads it"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    assert not marker.exists(), "the planted command ran"
    pickle.loads(pickle.dumps(_RunsCommand(marker)))  # the payload is real: unpickling it does run the command
    assert marker.exists()


def rewritten(path, metadata_change=None, tensors_change=None):
    """The checkpoint at `path` rewritten with changed metadata or tensors, checksum recomputed."""
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = {**tensors, **(tensors_change or {})}
    metadata = {**metadata, **(metadata_change or {}), "sha256": _digest(tensors)}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    path.write_bytes(save(tensors, metadata=metadata))


@pytest.mark.parametrize("change, message", [
    ({"config_digest": None}, r"has no 'config_digest' in its header"),
    ({"round": "two"}, r"header field 'round' is malformed"),
    ({"metrics": "[" * 100_000 + "]" * 100_000}, r"header field 'metrics' is malformed"),
    ({"metrics": json.dumps([{"round": 0}])}, r"metrics rows are not rounds 0..2"),
    ({"config": "[]"}, r"header field 'config' is a list, expected dict"),
    ({"rng_python": json.dumps([3, [1, 2], None])}, r"Python RNG state is malformed"),
    ({"format": "something else"}, r"is not a fedllm run state"),
])
def test_a_malformed_header_is_refused_naming_the_field(tmp_path, change, message):
    cfg = RunConfig()
    path = save_state(tmp_path, state(2, cfg))
    rewritten(path, metadata_change=change)
    with pytest.raises(CheckpointError, match=message):
        read_state(path)


def test_unexpected_or_malformed_tensors_are_refused(tmp_path):
    path = save_state(tmp_path, state(2, RunConfig()))
    rewritten(path, tensors_change={"code/anything": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'code/anything'"):
        read_state(path)
    path = save_state(tmp_path / "b", state(2, RunConfig()))
    rewritten(path, tensors_change={"rng/torch": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="torch RNG state is malformed"):
        read_state(path)
    for bad in (torch.full((4, 3), float("nan")), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(12)):
        path = save_state(tmp_path / "c", state(2, RunConfig()))
        rewritten(path, tensors_change={"subspace/layer.q_proj": bad})
        with pytest.raises(CheckpointError, match="re-factoring subspace is not a finite float32 matrix"):
            read_state(path)


def test_a_state_from_another_config_is_refused_naming_the_keys(tmp_path):
    save_state(tmp_path, state(2, RunConfig()))
    other = RunConfig.from_flower({"learning-rate": 0.01, "seed": 3})
    with pytest.raises(CheckpointError, match="differing keys: learning-rate, seed"):
        load_state(tmp_path, other.as_dict(), other.digest())
    longer = RunConfig.from_flower({"num-server-rounds": 50, "output-dir": "/elsewhere", "keep-checkpoints": 5})
    assert load_state(tmp_path, longer.as_dict(), longer.digest()).round == 2


def test_the_secret_noise_seed_never_reaches_a_checkpoint(tmp_path):
    cfg = RunConfig.from_flower({"dp": "central", "secret-seed": 987654321})
    path = save_state(tmp_path, state(1, cfg))
    assert b"987654321" not in path.read_bytes() and "secret-seed" not in cfg.as_dict()
    assert cfg.digest() == RunConfig.from_flower({"dp": "central", "secret-seed": 5}).digest()


def test_missing_state_says_there_is_nothing_to_resume(tmp_path):
    cfg = RunConfig()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    assert checkpoint_path(tmp_path, 7).name == "round-0007.safetensors"


def test_resume_without_a_folder_is_a_config_error():
    from fedllm.config import ConfigError

    with pytest.raises(ConfigError, match="resume = true needs output-dir"):
        RunConfig.from_flower({"resume": True})
    with pytest.raises(ConfigError, match="resume-round needs resume = true"):
        RunConfig.from_flower({"resume-round": 2})


def resumable(**overrides) -> Aggregator:
    """A server for one 6 × 4 module with two nodes, before its state is restored."""
    cfg = RunConfig.from_flower(overrides)
    a = Aggregator(cfg, Lora(cfg, {"layer.q_proj": Layer(torch.Size((6, 4)), transposed=False)}))
    for partition in range(2):
        a.nodes.admit(10 + partition, NodeInfo(partition_id=partition, rank=2, num_examples=40))
    return a


@pytest.mark.parametrize("global_delta, optimizer_state, message", [
    ({"layer.q_proj": torch.zeros(3, 4)}, {}, r"global update gives layer.q_proj the shape \(3, 4\), where this model's"),
    ({"layer.q_proj": torch.zeros(6, 4), "layer.k_proj": torch.zeros(6, 4)}, {}, r"no module of this model \(layer.k_proj\)"),
    ({}, {}, r"global update lacks modules of this model \(layer.q_proj\)"),
    ({"layer.q_proj": torch.full((6, 4), float("nan"))}, {}, r"global update has an entry of nan in layer.q_proj"),
    ({"layer.q_proj": torch.full((6, 4), 1e5)}, {}, r"entry of 1e\+05 in layer.q_proj \(non-finite or above 10000\)"),
    ({"layer.q_proj": torch.zeros(6, 4)}, {"m": {"layer.q_proj": torch.zeros(4, 6)}}, r"optimizer moment 'm' gives"),
    ({"layer.q_proj": torch.zeros(6, 4)}, {"v": {"layer.q_proj": torch.full((6, 4), float("inf"))}}, r"moment 'v' has an entry of inf"),
])
def test_a_whole_checkpoint_that_does_not_fit_the_model_is_refused_on_resume(global_delta, optimizer_state, message):
    """A checksum shows the file is whole, not that it belongs to this run's model."""
    a = resumable(**{"server-optimizer": "adam"})
    with pytest.raises(CheckpointError, match=message):
        a.restore(global_delta, optimizer_state, {})
    assert a.global_delta == {} and a.optimizer_state == {}, "nothing of a refused state is taken"
    a.restore({"layer.q_proj": torch.zeros(6, 4)}, {"m": {"layer.q_proj": torch.zeros(6, 4)}}, {})
    assert torch.equal(a.global_delta["layer.q_proj"], torch.zeros(6, 4))


def test_a_local_only_state_keeps_one_update_per_partition_and_each_must_fit():
    a = resumable(baseline="local-only")
    a.restore({"partition-0/layer.q_proj": torch.ones(6, 4), "partition-5/layer.q_proj": torch.zeros(6, 4)}, {}, {})
    for bad, message in (({"layer.q_proj": torch.zeros(6, 4)}, "no module of this model"),
                         ({"partition-x/layer.q_proj": torch.zeros(6, 4)}, "no module of this model"),
                         ({"partition-0/layer.q_proj": torch.zeros(4, 6)}, r"partition-0/layer.q_proj the shape \(4, 6\)")):
        with pytest.raises(CheckpointError, match=message):
            resumable(baseline="local-only").restore(bad, {}, {})
