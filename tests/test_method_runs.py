"""Every PEFT method in a real `flwr run` simulation: it runs, a one-client round makes the server
model exactly that client's model (replayed in this process), the export loads in peft and
reproduces the server model, and the reported upload bytes are the serialized reply sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.config import RunConfig
from fedllm.core.local import NodeSettings, local_round, worker_for
from fedllm.data import load_splits
from fedllm.methods import build_method
from fedllm.models import load_model
from fedllm.seeds import refactor_seed
from fedllm.data.format import Prompter
from fedllm.evaluation import EXACT_MATCH, score
from tests.conftest import simulate
from tests.reply_size import serialized_reply_size

ONE_CLIENT = ("model='builtin:micro' num-server-rounds=1 local-steps=4 train-per-task=12 test-per-task=4 "
              "partition='iid' min-clients=1 seed=3 num-virtual-tokens=4")
RUNS = {  # the LoRA path (plain, rsLoRA, DoRA) runs end to end in test_simulation.py and below; in-process in test_methods.py
    "ffa-lora": "peft-method='ffa-lora'",
    "prompt-tuning": "peft-method='prompt-tuning'",
    "prefix-tuning": "peft-method='prefix-tuning'",
    "p-tuning": "peft-method='p-tuning'",
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, flower_env, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    simulate(f"{ONE_CLIENT} {RUNS[request.param]}", clients=1, output_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, RunConfig.from_flower(summary["config"])


def replay_client(cfg: RunConfig):
    """Round 1 of partition 0, trained in this process from what the server sent it."""
    base, _ = load_model(cfg.model)
    method = build_method(cfg, base)
    method.evaluation_model(base)
    sent = method.sent_state(method.zero_update(), cfg.lora_rank, refactor_seed(cfg.seed, 1))
    node = NodeSettings(partition_id=0, num_partitions=1, rank=cfg.lora_rank, data_path="")
    update = local_round(cfg, node, worker_for(cfg), sent.state, server_round=1, steps=cfg.local_steps).update
    return worker_for(cfg).peft_model, method, sent, update


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[:, -ids.shape[1]:]


def test_the_run_trains_the_chosen_method(run):
    out, summary, cfg = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 1 and rows[1]["clients"] == 1 and rows[1]["rejected"] == 0
    assert math.isfinite(rows[1]["train_loss"])
    assert summary["config"]["peft-method"] == cfg.peft_method
    assert (out / "model").exists() == (cfg.peft_method in ("lora", "ffa-lora"))


def test_one_client_round_makes_the_server_model_that_client_s(run):
    out, summary, cfg = run
    client_model, method, _, _ = replay_client(cfg)
    adapter = PeftModel.from_pretrained(load_model(cfg.model)[0], str(out / "adapter"))
    if method.merges_into_weights:
        server_model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert torch.allclose(logits(adapter), logits(server_model), atol=1e-4), "export differs from model/"
    else:
        server_model = adapter  # the server model of a prompt method is its adapter on the base model
    assert not torch.allclose(logits(server_model), logits(load_model(cfg.model)[0]), atol=1e-3)
    assert torch.allclose(logits(server_model), logits(client_model), atol=1e-4)


def test_the_exported_adapter_reproduces_the_reported_accuracy(run):
    out, summary, cfg = run
    adapter = PeftModel.from_pretrained(load_model(cfg.model)[0], str(out / "adapter"))
    _, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                          test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    prompter = Prompter(load_model(cfg.model)[1], cfg.prompt_format)
    assert score(adapter, prompter, test).values[EXACT_MATCH] == summary["per_task_accuracy"]


def test_reported_upload_bytes_are_the_serialized_reply(run):
    out, summary, cfg = run
    _, method, sent, _ = replay_client(cfg)
    expected = serialized_reply_size(method.upload_shapes(sent, additive=False), cfg.upload_codec())
    reported = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["client_upload_bytes"]["0"]
    assert expected <= reported <= expected + 32, "only the metric values' varint lengths may differ"
