"""Real `flwr run` simulations end to end: outputs, exports, bytes, one model build per process."""

from __future__ import annotations

import json
import math

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm.adapters import default_target_modules, target_layers
from fedllm.config import ConfigError, RunConfig
from fedllm.core.local import NodeSettings, client_examples, run_splits
from fedllm.data import load_splits
from fedllm.launch import RunFailed, run_simulation
from fedllm.methods import build_method
from fedllm.models import load_model
from fedllm.data.format import Prompter
from fedllm.evaluation import EXACT_MATCH, score
from tests.conftest import PROJECT, simulate
from tests.reply_size import serialized_reply_size

SMALL = ("num-server-rounds=2 local-steps=8 train-per-task=60 test-per-task=10 "
         "partition='pathological:2' seed=5 validation-fraction=0.1")


@pytest.fixture(scope="module")
def small_run(flower_env, builtin_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_simulation(PROJECT, SMALL, clients=3, output_dir=out)
    return out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_every_output(small_run):
    metrics = rows(small_run)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    for row in metrics:
        for key in ("accuracy", "per_task_accuracy", "train_loss", "upload_bytes", "download_bytes", "round_seconds"):
            assert key in row, key
    assert all(r["upload_bytes"] > 0 and r["download_bytes"] > 0 and r["clients"] == 3 for r in metrics[1:])
    summary = json.loads((small_run / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["base_accuracy"] == metrics[0]["accuracy"]
    assert summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert summary["config"]["seed"] == 5 and summary["config"]["local-steps"] == 8
    assert (small_run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_model_reproduces_the_reported_accuracy(small_run):
    summary = json.loads((small_run / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(small_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(small_run / "model")
    cfg = RunConfig.from_flower(summary["config"])
    _, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                          test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    assert score(model, Prompter(tokenizer, cfg.prompt_format), test).values[EXACT_MATCH] == summary["per_task_accuracy"]


def test_the_validation_split_is_held_out_from_every_client_and_scored_exactly(small_run):
    summary = json.loads((small_run / "summary.json").read_text())
    cfg = RunConfig.from_flower(summary["config"])
    train, validation, test = run_splits(cfg)
    assert len(validation) == 6 * 6 and {e.task for e in validation} == {e.task for e in test}  # 10% of 60 per task
    held_out = {(e.task, e.input) for e in validation}
    assert not held_out & {(e.task, e.input) for e in train}
    for partition in range(3):
        node = NodeSettings(partition_id=partition, num_partitions=3, rank=cfg.lora_rank, data_path="")
        assert not held_out & {(e.task, e.input) for e in client_examples(cfg, node)}
    assert all("validation_accuracy" in r for r in rows(small_run) if "accuracy" in r)
    model = AutoModelForCausalLM.from_pretrained(small_run / "model")
    scores = score(model, Prompter(AutoTokenizer.from_pretrained(small_run / "model"), cfg.prompt_format), validation)
    assert summary["final_validation_accuracy"] == scores.headline(cfg.metric)


def test_adapter_loads_in_peft_and_differs_from_the_model_by_its_reported_error(small_run, builtin_path):
    base = AutoModelForCausalLM.from_pretrained(builtin_path)
    w0 = {n: l.weight.detach().clone() for n, l in target_layers(base, default_target_modules(base)).items()}
    merged = PeftModel.from_pretrained(base, str(small_run / "adapter")).merge_and_unload()
    exact = AutoModelForCausalLM.from_pretrained(small_run / "model")
    adapter_w = dict(merged.named_modules())
    exact_w = dict(exact.named_modules())
    error = norm = 0.0
    for name, weight in w0.items():
        delta_exact = exact_w[name].weight.detach() - weight
        delta_adapter = adapter_w[name].weight.detach() - weight
        error += float((delta_exact - delta_adapter).double().pow(2).sum())
        norm += float(delta_exact.double().pow(2).sum())
    reported = json.loads((small_run / "adapter" / "truncation_error.json").read_text())["relative_frobenius_error"]
    assert norm > 0, "training must have moved the server model"
    assert math.sqrt(error / norm) == pytest.approx(reported, abs=1e-4)


def test_each_client_process_builds_the_base_model_once(small_run):
    seen = {}
    for row in rows(small_run)[1:]:
        for pid, builds in row["client_processes"]:
            seen.setdefault(pid, set()).add(builds)
    assert seen and all(builds == {1} for builds in seen.values()), seen


def test_a_bad_key_is_refused_before_flower_starts(flower_env, tmp_path):
    with pytest.raises(ConfigError, match="unknown run-config key 'lora-rnak'"):
        run_simulation(PROJECT, "lora-rnak=4", clients=2, output_dir=tmp_path)


def test_a_run_that_fails_inside_flower_is_detected(flower_env, tmp_path, capfd):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(RunFailed, match="wrote no"):
        simulate(f"model='builtin:micro' dataset='{missing}'", clients=2, output_dir=tmp_path / "out")
    assert str(missing) in capfd.readouterr().out


@pytest.fixture(scope="module")
def feature_run(flower_env, tmp_path_factory):
    """One run of the features away from the defaults: a local dataset file, heterogeneous ranks,
    TIES with server momentum, rsLoRA uploading 10% of its model-space update in float16."""
    root = tmp_path_factory.mktemp("features")
    data = root / "mine.jsonl"
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
    lines = [{"instruction": "upper", "input": w, "output": w.upper(), "task": "upper"} for w in words]
    lines += [{"instruction": "echo", "input": w, "output": w, "task": "echo"} for w in words]
    data.write_text("\n".join(json.dumps(line) for line in lines))
    out = simulate(
        f"model='builtin:micro' dataset='{data}' partition='iid' test-fraction=0.25 num-server-rounds=2 "
        "local-steps=4 client-ranks='4,8' aggregation='ties' aggregation-density=0.5 server-optimizer='momentum' "
        "server-momentum=0.5 lora-variant='rslora' upload-dtype='float16' upload-sparsity=0.1",
        clients=3, output_dir=root / "out",
    )
    return out, data, json.loads((out / "summary.json").read_text())


def test_a_run_on_a_local_dataset_file_reports_its_tasks(feature_run):
    out, data, summary = feature_run
    assert set(summary["per_task_accuracy"]) == {"upper", "echo"}
    assert summary["config"]["dataset"] == str(data)
    assert [r["round"] for r in rows(out)] == [0, 1, 2]


def test_heterogeneous_ranks_with_ties_and_server_momentum(feature_run):
    out, _, summary = feature_run
    assert [(n["partition_id"], n["rank"]) for n in summary["nodes"]] == [(0, 4), (1, 8), (2, 4)]
    assert summary["config"]["aggregation"] == "ties" and summary["config"]["server-optimizer"] == "momentum"
    last = rows(out)[-1]
    assert set(last["refactor_error"]) == {"4", "8"}
    # after a round of three rank-4/8 updates, rank 4 loses more of the global update than rank 8
    assert last["refactor_error"]["4"] > last["refactor_error"]["8"] >= 0.0


def test_sparse_half_precision_uploads_are_as_small_as_promised(feature_run):
    out, _, summary = feature_run
    cfg = RunConfig.from_flower(summary["config"])
    shapes = {name: t.shape for name, t in build_method(cfg, load_model(cfg.model)[0]).zero_update().items()}
    expected = serialized_reply_size(shapes, cfg.upload_codec())  # LoRA's sparse upload is its model-space τ
    dense = serialized_reply_size(shapes, RunConfig.from_flower({}).upload_codec())
    for row in rows(out)[1:]:
        assert row["clients"] == 3 and row["rejected"] == 0
        for size in row["client_upload_bytes"].values():
            assert expected <= size <= expected + 32
    assert expected < 0.3 * dense, "10% of entries at 6 bytes each (int32 index, float16 value) against 4 bytes each"


def test_the_staged_app_bundles_to_the_fab_flower_builds_from_the_project(tmp_path):
    """`flwr run` is given a staged copy of the app (fedllm.launch.bundled_files): same FAB bytes."""
    from flwr.cli.build import build_fab_from_disk

    from fedllm.launch import bundled_files, staged_app

    names = {p.as_posix() for p in bundled_files(PROJECT)}
    assert {"pyproject.toml", "server/app.py", "client/app.py", "fedllm/launch.py"} <= names
    assert not any(n.startswith((".venv/", "outputs/", ".git/")) or "__pycache__" in n for n in names)
    assert build_fab_from_disk(staged_app(PROJECT, tmp_path)) == build_fab_from_disk(PROJECT)
