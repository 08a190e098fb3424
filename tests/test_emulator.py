"""Emulators in-process: which layers they keep, the exact name mapping to the full model, the
digest, per-layer merging, and distillation. Real models (tiny random Llamas, the embedded
micro-4l), real peft adapters, real training steps."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.config import ConfigError, RunConfig
from fedllm.core.aggregator import Aggregator, Contribution
from fedllm.core.local import NodeSettings, Worker, local_round
from fedllm.distill import distill_middle_layers, gap_loss, spans
from fedllm.emulator import (
    ClientModel, EmulatorError, build_emulator, decoder_layers, instantiate, load_cached, save_cached, uniform_layers,
    verified,
)
from fedllm.methods import build_method
from fedllm.models import load_model, load_tokenizer
from fedllm.seeds import refactor_seed
from server.emulators import restrict


def llama(layers: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )).eval()


def emulator_of(model, keep: str):
    kept = ClientModel.parse(keep).kept_layers(model.config.num_hidden_layers)
    return build_emulator(model, model.state_dict(), kept)


def test_emulators_keep_first_last_and_an_even_spread():
    assert uniform_layers(8, 2) == (0, 7)
    assert uniform_layers(8, 4) == (0, 2, 5, 7)
    assert uniform_layers(8, 8) == tuple(range(8))
    assert ClientModel.parse("emulator:0.5").kept_layers(8) == (0, 2, 5, 7)
    assert ClientModel.parse("emulator:0.25").kept_layers(8) == (0, 7)
    assert ClientModel.parse("emulator:3").kept_layers(12) == (0, 6, 11)
    assert ClientModel.parse("emulator:1.0").kept_layers(4) == (0, 1, 2, 3)
    assert ClientModel.parse("full").is_full and str(ClientModel.parse("emulator:0.5")) == "emulator:0.5"


@pytest.mark.parametrize("text", ["emulator:1", "emulator:0", "emulator:1.5", "emulator:0.0", "emulator:half", "emulator:"])
def test_bad_client_models_are_refused_with_what_is_accepted(text):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        ClientModel.parse(text)


def test_an_emulator_cannot_keep_more_layers_than_the_model_has():
    with pytest.raises(EmulatorError, match="keeps 9 layers but the base model has 8"):
        ClientModel.parse("emulator:9").kept_layers(8)


def test_emulator_layer_i_is_full_layer_kept_i():
    model = llama(5)
    emulator = emulator_of(model, "emulator:3")
    assert emulator.layer_map.kept == (0, 2, 4) and emulator.layer_map.prefix == "model.layers"
    full = model.state_dict()
    for name, tensor in emulator.state.items():
        assert torch.equal(tensor, full[emulator.layer_map.to_full(name)]), name
    assert emulator.layer_map.to_full("model.layers.1.self_attn.q_proj") == "model.layers.2.self_attn.q_proj"
    assert emulator.layer_map.to_emulator("base_model.model.model.layers.4.mlp.up_proj.lora_A.weight") == (
        "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight")
    assert emulator.layer_map.to_emulator("model.layers.3.mlp.up_proj") is None  # dropped
    assert emulator.layer_map.to_emulator("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert "lm_head.weight" not in emulator.state  # tied to the embedding: sent once


def test_an_instantiated_emulator_is_the_full_model_with_the_other_layers_removed():
    model = llama(5)
    emulator = emulator_of(model, "emulator:3")
    reference = copy.deepcopy(model)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (0, 2, 4)])
    reference.config.num_hidden_layers = 3
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        got = instantiate(emulator)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_digest_catches_a_changed_weight_in_transit_and_on_disk(tmp_path):
    emulator = emulator_of(llama(4), "emulator:2")
    kept, prefix = emulator.layer_map.kept, emulator.layer_map.prefix
    assert verified(emulator.config_json, kept, prefix, emulator.state, emulator.digest).digest == emulator.digest
    tampered = {k: v.clone() for k, v in emulator.state.items()}
    tampered["model.layers.1.mlp.down_proj.weight"][0, 0] += 1e-3
    with pytest.raises(EmulatorError, match="do not match their digest"):
        verified(emulator.config_json, kept, prefix, tampered, emulator.digest)
    folder = save_cached(emulator, tmp_path)
    assert load_cached(tmp_path, emulator.digest).digest == emulator.digest
    assert load_cached(tmp_path, "0" * 64) is None
    meta = json.loads((folder / "emulator.json").read_text())
    (folder / "emulator.json").write_text(json.dumps({**meta, "kept": [0, 2]}))
    with pytest.raises(EmulatorError, match="do not match their digest"):
        load_cached(tmp_path, emulator.digest)


def micro_config(client_model: str, **extra) -> RunConfig:
    return RunConfig.from_flower({"model": "builtin:micro-4l", "local-steps": 3, "batch-size": 4,
                                  "train-per-task": 6, "client-model": client_model, **extra})


@pytest.mark.parametrize("method", ["lora", "ffa-lora"])
def test_an_emulator_keeping_every_layer_trains_exactly_as_the_full_model(method):
    """The client's whole path, real training on the embedded model: the same upload bit for bit."""
    cfg = micro_config("emulator:1.0", **{"peft-method": method})
    base, tokenizer = load_model(cfg.model)
    server_method = build_method(cfg, base)
    server_method.evaluation_model(base)
    sent = server_method.sent_state(server_method.zero_update(), 8, refactor_seed(cfg.seed, 1))
    emulator = build_emulator(base, base.state_dict(), tuple(range(4)))
    node = NodeSettings(partition_id=0, num_partitions=2, rank=8, data_path="")
    full = Worker(cfg, "full", copy.deepcopy(base), tokenizer)
    small = Worker(cfg, "emulator", instantiate(emulator), load_tokenizer(cfg.model), emulator.layer_map)
    assert small.training_data(cfg, node) == full.training_data(cfg, node)
    expected = local_round(cfg, node, full, sent.state, server_round=1, steps=3).update
    got = local_round(cfg, node, small, emulator.layer_map.emulator_names(sent.state), server_round=1, steps=3).update
    got = emulator.layer_map.full_names(got)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_emulator_update_lands_on_the_full_models_layers_and_ffa_lora_shares_its_frozen_a():
    cfg = micro_config("emulator:2", **{"peft-method": "ffa-lora"})
    base, tokenizer = load_model(cfg.model)
    server_method = build_method(cfg, base)
    server_method.evaluation_model(base)
    sent = server_method.sent_state(server_method.zero_update(), 8, refactor_seed(cfg.seed, 1))
    emulator = build_emulator(base, base.state_dict(), (0, 3))
    worker = Worker(cfg, "emulator", instantiate(emulator), load_tokenizer(cfg.model), emulator.layer_map)
    assert torch.equal(worker.method.frozen_a("model.layers.1.self_attn.q_proj", 8),
                       server_method.frozen_a("model.layers.3.self_attn.q_proj", 8))
    node = NodeSettings(partition_id=0, num_partitions=2, rank=8, data_path="")
    upload = local_round(cfg, node, worker, emulator.layer_map.emulator_names(sent.state), 1, 3).update
    tau = server_method.update_from_upload(emulator.layer_map.full_names(upload), restrict(sent, emulator.layer_map),
                                           additive=False)
    layers = {int(module.split(".")[2]) for module in tau}
    assert layers == {0, 3} and len(tau) == 2 * 7
    for module, delta in tau.items():
        assert delta.shape == server_method.layers[module].shape and delta.abs().sum() > 0


def test_a_layer_is_merged_over_the_clients_that_trained_it_with_their_weights_renormalized():
    cfg = RunConfig.from_flower({"aggregation": "weighted_average"})
    aggregator = Aggregator(cfg, build_method(cfg, llama(3)))
    aggregator.global_delta = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}  # three toy modules
    updates = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0, 0.0])},
               {"a": torch.tensor([3.0, 6.0])},
               {"a": torch.tensor([5.0, 0.0]), "b": torch.tensor([1.0, 1.0])}]
    merged = aggregator.merge(1, [Contribution(n, u, w) for n, (u, w) in enumerate(zip(updates, [1.0, 2.0, 3.0]))])
    torch.testing.assert_close(merged["a"], torch.tensor([1 + 6 + 15, 2 + 12 + 0]) / 6.0)
    torch.testing.assert_close(merged["b"], torch.tensor([4.0 + 3.0, 3.0]) / 4.0)  # weights 1 and 3 only
    assert torch.equal(merged["c"], torch.zeros(2))  # nobody trained it: no change


def test_distillation_narrows_the_gap_to_the_full_model_and_leaves_first_and_last_layers_alone():
    teacher = llama(6)
    emulator = emulator_of(teacher, "emulator:3")  # layers 0, 3, 5: emulator layer 1 stands for full layers 1..4
    assert spans(emulator.layer_map.kept) == {1: (1, 5)}
    assert spans((0, 2, 5, 7)) == {1: (1, 3), 2: (3, 7)}
    student = instantiate(emulator)
    generator = torch.Generator().manual_seed(0)
    data = [(ids := torch.randint(3, 40, (12,), generator=generator).tolist(), ids) for _ in range(32)]
    before = gap_loss(teacher, student, emulator.layer_map, data, pad_id=0)
    edges = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("model.layers.1.")}
    losses = distill_middle_layers(teacher, student, emulator.layer_map, data, steps=30, batch_size=16,
                                   learning_rate=3e-3, seed=0, pad_id=0)
    after = gap_loss(teacher, student, emulator.layer_map, data, pad_id=0)
    assert after < 0.5 * before, (before, after)
    assert losses[-1] < losses[0]
    assert all(torch.equal(student.state_dict()[k], v) for k, v in edges.items())
    assert not any(p.requires_grad for p in student.parameters())


def test_decoder_layers_are_found_in_gpt2_too():
    from tests.tiny_models import tiny_gpt2

    name, layers = decoder_layers(tiny_gpt2())
    assert name == "transformer.h" and len(layers) == 2


@pytest.mark.parametrize("extra, message", [
    ({"peft-method": "prompt-tuning"}, "peft-method 'prompt-tuning'"),
    ({"secure-aggregation": True, "peft-method": "ffa-lora"}, "secure-aggregation"),
    ({"dp": "central"}, "dp 'central'"),
    ({"baseline": "local-only"}, "baseline 'local-only'"),
])
def test_emulators_refuse_what_they_cannot_combine_with(extra, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"client-model": "emulator:0.5", **extra})


def test_client_model_keys_are_checked_at_the_edge():
    with pytest.raises(ConfigError, match="client-model"):
        RunConfig.from_flower({"client-model": "emulator:half"})
    with pytest.raises(ConfigError, match="emulator-distill-steps and emulator-adapters need emulator clients"):
        RunConfig.from_flower({"emulator-distill-steps": 10})
    cfg = RunConfig.from_flower({"client-model": "emulator:0.5, full"})
    assert [cfg.client_model_for_partition(p) for p in range(3)] == ["emulator:0.5", "full", "emulator:0.5"]


def test_a_node_without_the_builtin_model_makes_the_same_tokenizer(tmp_path, monkeypatch):
    from fedllm.data import builtin_suite
    from fedllm.data.format import Prompter
    from fedllm.train import encode

    examples = builtin_suite(5, 1, 0)[0]
    saved = encode(Prompter(load_tokenizer("builtin:micro-4l")), examples, 128)
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))  # nothing built here: the tokenizer is made afresh
    assert not any(tmp_path.iterdir())
    assert encode(Prompter(load_tokenizer("builtin:micro-4l")), examples, 128) == saved


@pytest.mark.parametrize("method", ["lora", "ffa-lora"])
def test_ends_adapters_train_and_send_only_the_exact_first_and_last_layers(method):
    cfg = micro_config("emulator:3", **{"peft-method": method, "emulator-adapters": "ends"})
    base, _ = load_model(cfg.model)
    server_method = build_method(cfg, base)
    server_method.evaluation_model(base)
    sent = server_method.sent_state(server_method.zero_update(), 8, refactor_seed(cfg.seed, 1))
    emulator = build_emulator(base, base.state_dict(), (0, 2, 3))
    layer_map = emulator.layer_map.with_adapters("ends")
    worker = Worker(cfg, "emulator", instantiate(emulator), load_tokenizer(cfg.model), layer_map)
    sent_to_client = layer_map.emulator_names(restrict(sent, layer_map).state)
    assert {int(k.split(".")[4]) for k in sent_to_client} == {0, 2}  # emulator layers 0 and 2 = full 0 and 3
    node = NodeSettings(partition_id=0, num_partitions=2, rank=8, data_path="")
    upload = local_round(cfg, node, worker, sent_to_client, 1, 3).update
    tau = server_method.update_from_upload(layer_map.full_names(upload), restrict(sent, layer_map), additive=False)
    assert {int(module.split(".")[2]) for module in tau} == {0, 3} and len(tau) == 2 * 7
    trainable = {n for n, p in worker.peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.0." in n or ".layers.2." in n for n in trainable)
