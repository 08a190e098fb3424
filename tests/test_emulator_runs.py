"""Emulator clients in real `flwr run` simulations on the embedded 4-layer micro model: an
emulator keeping every layer reproduces the full-model run bit for bit, its weights travel once
per run (measured on the wire), and clients of mixed sizes (adapting only their exact first and
last layers) merge per layer with their weights."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedllm.checkpoint import load_state
from fedllm.config import RunConfig
from fedllm.emulator import LayerMap
from fedllm.methods import build_method
from fedllm.models import load_model
from fedllm.seeds import refactor_seed
from server.emulators import restrict
from tests.conftest import simulate

SMALL = "model='builtin:micro-4l' local-steps=3 train-per-task=20 test-per-task=4"


def run(tmp_path_factory, name: str, settings: str, clients: int):
    out = tmp_path_factory.mktemp(name)
    simulate(f"{SMALL} {settings}", clients=clients, output_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = RunConfig.from_flower(summary["config"])
    return summary, rows, load_state(out, cfg.as_dict(), cfg.digest()), cfg


@pytest.fixture(scope="module")
def full_and_whole_emulator(flower_env, tmp_path_factory):
    full = run(tmp_path_factory, "full", "num-server-rounds=2", 2)
    whole = run(tmp_path_factory, "whole", "num-server-rounds=2 client-model='emulator:1.0'", 2)
    return full, whole


def test_an_emulator_keeping_every_layer_reproduces_the_full_model_run_exactly(full_and_whole_emulator):
    (full_summary, _, full_state, _), (whole_summary, _, whole_state, _) = full_and_whole_emulator
    assert whole_summary["emulators"]["emulator:1.0"]["layers"] == [0, 1, 2, 3]
    assert full_state.global_delta.keys() == whole_state.global_delta.keys()
    assert all(torch.equal(full_state.global_delta[k], whole_state.global_delta[k]) for k in full_state.global_delta)
    assert any(t.abs().sum() > 0 for t in whole_state.global_delta.values())
    assert whole_summary["per_task_accuracy"] == full_summary["per_task_accuracy"]


def test_emulator_weights_travel_once_per_run_not_per_round(full_and_whole_emulator):
    (_, full_rows, _, _), (whole_summary, whole_rows, _, _) = full_and_whole_emulator
    weights = whole_summary["emulators"]["emulator:1.0"]["base_bytes"]
    for partition in ("0", "1"):
        first = whole_rows[1]["client_download_bytes"][partition] - full_rows[1]["client_download_bytes"][partition]
        second = whole_rows[2]["client_download_bytes"][partition] - full_rows[2]["client_download_bytes"][partition]
        assert weights <= first <= 1.1 * weights, (first, weights)  # the weights, with their names and config
        assert 0 < second < 200, second  # later rounds: only the emulator's digest
        # the same tensors up; the reply's metrics hold the client's pid, whose varint may be a byte longer
        uploads = (whole_rows[2]["client_upload_bytes"][partition], full_rows[2]["client_upload_bytes"][partition])
        assert abs(uploads[0] - uploads[1]) <= 2, uploads


def audited_uploads(audit_dir) -> list:
    """The train replies the server received, in the order it received them."""
    replies = []
    for path in sorted(audit_dir.glob("*.pb")):
        proto = ProtoRecordDict()
        proto.ParseFromString(path.read_bytes())
        content = recorddict_from_proto(proto)
        if "arrays" in content and "metrics" in content:
            replies.append(content)
    return replies


def test_mixed_emulator_sizes_merge_each_layer_over_the_clients_that_trained_it(flower_env, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit")
    summary, rows, state, cfg = run(
        tmp_path_factory, "mixed", f"num-server-rounds=1 peft-method='ffa-lora' audit-dir='{audit}' "
        "client-model='emulator:2,full,emulator:3' emulator-adapters='ends'", 3)
    kept = {p: tuple(summary["emulators"][m]["layers"]) for p, m in enumerate(("emulator:2", "full", "emulator:3"))}
    assert kept == {0: (0, 3), 1: (0, 1, 2, 3), 2: (0, 2, 3)}
    adapted = {0: (0, 3), 1: (0, 1, 2, 3), 2: (0, 3)}  # 'ends': an emulator trains its first and last layer only
    assert rows[1]["client_download_bytes"]["0"] < rows[1]["client_download_bytes"]["2"]

    # replay the server's side: each client's τ_k from what it uploaded, under the full model's names
    base, _ = load_model(cfg.model)
    method = build_method(cfg, base)
    sent = method.sent_state(method.zero_update(), cfg.lora_rank, refactor_seed(cfg.seed, 1))
    updates, weights = {}, {}
    for reply in audited_uploads(audit):
        partition = int(reply["metrics"]["partition-id"])
        layer_map = LayerMap("model.layers", kept[partition], adapted[partition] if partition != 1 else ())
        upload = layer_map.full_names(reply["arrays"].to_torch_state_dict())
        updates[partition] = method.update_from_upload(upload, restrict(sent, layer_map), additive=False)
        weights[partition] = float(reply["metrics"]["num-examples"])
    assert sorted(updates) == [0, 1, 2]
    for module, merged in state.global_delta.items():
        having = [p for p in sorted(updates) if module in updates[p]]
        layer = int(module.split(".")[2])
        assert having == [p for p in (0, 1, 2) if layer in adapted[p]], module
        expected = sum(weights[p] * updates[p][module] for p in having) / sum(weights[p] for p in having)
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
