"""The update space: exact aggregation of LoRA updates, re-factoring, and peft round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedllm.adapters import (
    LoraSettings, base_weights_of, default_target_modules, deltas_from_state, export_adapter, factor_key,
    layouts_of, merge_into, refactor,
)
from fedllm.merge import get_operator


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def random_lora_state(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA state dict with random factors for modules of (d_out, d_in) shapes."""
    state = {}
    for module, (d_out, d_in) in shapes.items():
        state[factor_key(module, "A")] = torch.randn(rank, d_in, generator=generator)
        state[factor_key(module, "B")] = torch.randn(d_out, rank, generator=generator)
    return state


def test_aggregating_lora_updates_is_exact_where_factor_averaging_is_not():
    generator = torch.Generator().manual_seed(1)
    shapes = {"layer.q_proj": (24, 16), "layer.down_proj": (16, 40)}
    layouts = {m: False for m in shapes}
    rank, scaling, clients = 4, 2.0, 5
    states = [random_lora_state(shapes, rank, generator) for _ in range(clients)]
    weights = torch.tensor([3.0, 1.0, 7.0, 2.0, 5.0])
    p = weights / weights.sum()
    average = get_operator("weighted_average")
    for module in shapes:
        taus = torch.stack([deltas_from_state(s, scaling, layouts)[module] for s in states])
        merged = average(taus, weights)
        a, b = factor_key(module, "A"), factor_key(module, "B")
        exact = sum(p[k] * scaling * states[k][b] @ states[k][a] for k in range(clients))
        factor_avg = scaling * sum(p[k] * states[k][b] for k in range(clients)) @ sum(p[k] * states[k][a] for k in range(clients))
        assert torch.allclose(merged, exact, atol=1e-5, rtol=1e-5)
        assert (factor_avg - exact).norm() / exact.norm() > 0.1


def test_refactor_is_exact_within_rank_and_reports_truncation_error():
    generator = torch.Generator().manual_seed(2)
    low_rank = torch.randn(30, 3, generator=generator) @ torch.randn(3, 20, generator=generator)
    full = torch.randn(30, 20, generator=generator)
    layouts = {"m": False}
    scaling = 16 / 8
    exact = refactor({"m": low_rank}, 8, scaling, layouts, seed=0)
    product = deltas_from_state(exact.state, scaling, layouts)["m"]
    assert torch.allclose(product, low_rank, atol=1e-4)
    assert exact.relative_error < 1e-5

    truncated = refactor({"m": full}, 4, scaling, layouts, seed=0)
    product = deltas_from_state(truncated.state, scaling, layouts)["m"]
    u, s, vh = torch.linalg.svd(full)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert torch.allclose(product, best, atol=1e-4)
    direct = float((full - best).norm() / full.norm())
    assert truncated.relative_error == pytest.approx(direct, rel=1e-4)


def test_zero_update_refactors_to_trainable_factors_with_zero_product():
    refactored = refactor({"m": torch.zeros(12, 10)}, 4, 2.0, {"m": False}, seed=3)
    a, b = refactored.state[factor_key("m", "A")], refactored.state[factor_key("m", "B")]
    assert torch.count_nonzero(b) == 0
    assert (a.abs().sum(dim=1) > 0).all(), "every A row must be non-zero so B receives gradients"
    assert refactored.relative_error == 0.0


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_exported_adapter_loads_in_peft_and_matches_the_server_model(tmp_path, make_model):
    base = make_model()
    targets = default_target_modules(base)
    layouts = layouts_of(base, targets)
    w0 = base_weights_of(base, targets)
    settings = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=targets)
    generator = torch.Generator().manual_seed(4)
    # a global update of rank <= 4 per module, in each layer's own layout
    delta = {}
    for module, weight in w0.items():
        rows, cols = weight.shape
        delta[module] = 0.05 * torch.randn(rows, 2, generator=generator) @ torch.randn(2, cols, generator=generator)

    server_model = copy.deepcopy(base)
    merge_into(server_model, w0, delta)
    refactored = export_adapter(copy.deepcopy(base), settings, delta, layouts, tmp_path / "adapter", seed=0)
    assert refactored.relative_error < 1e-5

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 40, (2, 12), generator=generator)
    with torch.no_grad():
        expected = server_model(ids).logits
        got = loaded(ids).logits
        untouched = base(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-3)
    assert (tmp_path / "adapter" / "truncation_error.json").exists()
