"""A real pretrained chat model end to end in a real simulation: SmolLM2-135M-Instruct from its
package, trained and scored in its chat template, evaluated on the server and by each client on its
own held-out share (one run serves every test here)."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm.config import RunConfig
from fedllm.core.local import NodeSettings, client_test_examples
from fedllm.data import load_splits
from fedllm.data.format import Prompter
from fedllm.evaluation import EXACT_MATCH, LOSS, score
from tests.conftest import simulate

REAL = ("model='smollm2-135m-instruct' evaluation='both' num-server-rounds=1 local-steps=2 batch-size=4 "
        "train-per-task=6 test-per-task=3 partition='pathological:3' lora-rank=4 "
        "lora-target-modules='q_proj,v_proj' seed=3")


@pytest.fixture(scope="module")
def real_run(flower_env, smollm2_path, tmp_path_factory):
    out = simulate(REAL, 2, tmp_path_factory.mktemp("real"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return out, rows, summary, RunConfig.from_flower(summary["config"])


def test_every_client_scores_its_own_held_out_share_and_together_they_cover_the_test_split(real_run):
    _, rows, summary, cfg = real_run
    _, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                          test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    for row in rows:
        assert set(row["client_accuracy"]) == {"0", "1"} and row["evaluation_rejected"] == []
        shares = [client_test_examples(cfg, NodeSettings(p, 2, cfg.lora_rank, "")) for p in (0, 1)]
        for partition, share in zip("01", shares):
            tasks = sorted({e.task for e in share})
            assert row["client_examples"][partition] == {t: sum(e.task == t for e in share) for t in tasks}
        assert sorted(map(repr, shares[0] + shares[1])) == sorted(map(repr, test))
        assert row["evaluate_upload_bytes"] > 0 and row["evaluate_download_bytes"] > 0
    assert summary["client_accuracy"] == rows[-1]["client_accuracy"]


def test_the_clients_pooled_scores_of_the_base_model_are_the_servers(real_run):
    _, rows, _, _ = real_run
    base = rows[0]  # ΔW_g = 0: the clients hold exactly the server's model, on the server's split between them
    assert base["per_task_accuracy"] == base["server_per_task_accuracy"]
    assert base["metrics"][LOSS] == pytest.approx(base["server_metrics"][LOSS], rel=1e-4)


def test_the_headline_is_the_example_weighted_pool_of_the_clients(real_run):
    _, rows, _, _ = real_run
    final = rows[-1]
    for task, value in final["per_task_accuracy"].items():
        held = {p: examples[task] for p, examples in final["client_examples"].items() if task in examples}
        pooled = sum(n * final["client_metrics"][p][EXACT_MATCH][task] for p, n in held.items()) / sum(held.values())
        assert value == pytest.approx(pooled)
    assert final["accuracy"] == pytest.approx(sum(final["per_task_accuracy"].values()) / len(final["per_task_accuracy"]))


def test_the_exported_chat_model_reproduces_the_servers_scores_and_its_adapter_loads(real_run, smollm2_path):
    out, rows, _, cfg = real_run
    assert rows[1]["train_loss"] > 0 and rows[1]["clients"] == 2
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompter = Prompter(tokenizer, cfg.prompt_format)
    assert prompter.chat, "the chat template travels with the exported model"
    _, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                          test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert score(model, prompter, test).values[EXACT_MATCH] == rows[-1]["server_per_task_accuracy"]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), str(out / "adapter"))
    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template and adapter.peft_config["default"].r == 4
