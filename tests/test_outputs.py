"""A run's outputs never destroy an earlier run, never write through a link, stay private to their
owner and hold no secret."""

from __future__ import annotations

import json
import stat

import pytest

from fedllm.config import RunConfig
from fedllm.evaluation import EXACT_MATCH, LOSS, ROUGE_L, Scores
from fedllm.outputs import EarlierRunError, UnsafeOutputError, claim_output_folder, make_private
from server.record import RunRecorder, output_dir_for


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def scored(per_task: dict[str, float]) -> dict:
    """A row's evaluation fields for these exact-match scores (one example per task)."""
    values = {EXACT_MATCH: per_task, ROUGE_L: per_task, LOSS: dict.fromkeys(per_task, 1.0)}
    return Scores(dict.fromkeys(per_task, 1), values).fields(EXACT_MATCH)


def finished_run(folder) -> dict[str, bytes]:
    """A folder as a finished run leaves it; returns every file's bytes."""
    cfg = RunConfig.from_flower({"output-dir": str(folder)})
    recorder = RunRecorder(output_dir_for(cfg), cfg)
    for r in range(3):
        recorder.record(r, **scored({"copy": r / 4, "reverse": r / 8}), train_loss=None if r == 0 else 1.0 / r)
    recorder.finish()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "round-0002.safetensors").write_bytes(b"state")
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_finished_run_is_refused_untouched_without_resume_or_overwrite(tmp_path):
    before = finished_run(tmp_path)
    cfg = RunConfig.from_flower({"output-dir": str(tmp_path)})
    with pytest.raises(EarlierRunError, match=r"already holds a run \(metrics.jsonl, summary.json, accuracy.png, "
                                               r"checkpoints\); it is left untouched. Set resume=true"):
        output_dir_for(cfg)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_removes_the_earlier_run_outputs_and_nothing_else(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    claim_output_folder(tmp_path, resuming=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resuming_keeps_the_earlier_run(tmp_path):
    before = finished_run(tmp_path)
    claim_output_folder(tmp_path, resuming=True, overwrite=False)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_outputs_are_private_files_in_a_private_folder(tmp_path):
    folder = tmp_path / "run"
    finished_run(folder)
    assert mode(folder) == 0o700
    for name in ("metrics.jsonl", "summary.json", "accuracy.png"):
        assert mode(folder / name) == 0o600, name


def test_a_link_planted_where_an_output_goes_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").symlink_to(target)
    cfg = RunConfig.from_flower({"output-dir": str(folder), "resume": True})
    with pytest.raises(UnsafeOutputError, match=r"metrics.jsonl is a symbolic link; fedllm does not write through links"):
        RunRecorder(output_dir_for(cfg), cfg)
    assert target.read_text() == "keep me"


def test_make_private_tightens_a_tree_and_removes_links_inside(tmp_path):
    tree = tmp_path / "model"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "weights.bin").write_bytes(b"w")
    (tree / "link").symlink_to(tmp_path)
    make_private(tree)
    assert mode(tree) == mode(tree / "sub") == 0o700 and mode(tree / "sub" / "weights.bin") == 0o600
    assert not (tree / "link").exists() and tmp_path.exists()


def test_the_secret_noise_seed_is_not_in_the_summary(tmp_path):
    cfg = RunConfig.from_flower({"output-dir": str(tmp_path), "dp": "central", "secret-seed": 424242})
    recorder = RunRecorder(output_dir_for(cfg), cfg)
    recorder.record(0, **scored({"copy": 0.0}))
    recorder.finish()
    text = (tmp_path / "summary.json").read_text()
    assert "424242" not in text and "secret-seed" not in json.loads(text)["config"]
