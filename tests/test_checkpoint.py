"""Run state: atomic writes, verified loads, and refusals that say what is wrong."""

from __future__ import annotations

import pytest
import torch

from fedllm.checkpoint import STATE_FILE, CheckpointError, RunState, capture_rng, load_state, save_state
from fedllm.config import RunConfig


def state(round_: int, cfg: RunConfig) -> RunState:
    generator = torch.Generator().manual_seed(round_)
    return RunState(
        round=round_,
        global_delta={"layer.q_proj": torch.randn(6, 4, generator=generator)},
        optimizer_state={"u": {"layer.q_proj": torch.randn(6, 4, generator=generator)}},
        metrics=[{"round": r, "accuracy": r / 10} for r in range(round_ + 1)],
        config=cfg.as_dict(), config_digest=cfg.digest(), rng=capture_rng(),
    )


def test_round_trip_restores_every_tensor_and_row(tmp_path):
    cfg = RunConfig()
    save_state(tmp_path, state(3, cfg))
    loaded = load_state(tmp_path, cfg.as_dict(), cfg.digest())
    original = state(3, cfg)
    assert loaded.round == 3 and loaded.metrics == original.metrics
    assert torch.equal(loaded.global_delta["layer.q_proj"], original.global_delta["layer.q_proj"])
    assert torch.equal(loaded.optimizer_state["u"]["layer.q_proj"], original.optimizer_state["u"]["layer.q_proj"])


def test_a_newer_state_replaces_the_older_atomically(tmp_path):
    cfg = RunConfig()
    save_state(tmp_path, state(1, cfg))
    save_state(tmp_path, state(2, cfg))
    assert load_state(tmp_path, cfg.as_dict(), cfg.digest()).round == 2
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()


def test_an_interrupted_write_leaves_the_previous_state_usable(tmp_path):
    cfg = RunConfig()
    save_state(tmp_path, state(4, cfg))
    (tmp_path / (STATE_FILE + ".tmp")).write_bytes(b"FEDLLM-STATE v1\n{half a header")  # crash mid-write
    assert load_state(tmp_path, cfg.as_dict(), cfg.digest()).round == 4


def test_truncated_and_altered_files_are_refused_and_left_in_place(tmp_path):
    cfg = RunConfig()
    save_state(tmp_path, state(2, cfg))
    path = tmp_path / STATE_FILE
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    altered = bytearray(good)
    altered[-50] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())
    assert path.read_bytes() == bytes(altered), "a refused file is never overwritten by loading"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a fedllm run state"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())


def test_a_state_from_another_config_is_refused_naming_the_keys(tmp_path):
    save_state(tmp_path, state(2, RunConfig()))
    other = RunConfig.from_flower({"learning-rate": 0.01, "seed": 3})
    with pytest.raises(CheckpointError, match="differing keys: learning-rate, seed"):
        load_state(tmp_path, other.as_dict(), other.digest())
    longer = RunConfig.from_flower({"num-server-rounds": 50, "output-dir": "/elsewhere"})
    assert load_state(tmp_path, longer.as_dict(), longer.digest()).round == 2


def test_missing_state_says_there_is_nothing_to_resume(tmp_path):
    cfg = RunConfig()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_state(tmp_path, cfg.as_dict(), cfg.digest())


def test_resume_without_a_folder_is_a_config_error():
    from fedllm.config import ConfigError

    with pytest.raises(ConfigError, match="resume = true needs output-dir"):
        RunConfig.from_flower({"resume": True})
