"""The embedded model and tokenizer: standard save/load round trips, caching, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm import models
from fedllm.models import BUILTIN_MODELS, char_tokenizer, load_model, resolve_model


def test_char_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "swap ends\nab cd\n>dbca"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert len(ids) == len(text), "one token per character"
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert loaded("é", add_special_tokens=False)["input_ids"] == [loaded.unk_token_id]


def test_builtin_model_is_cached_and_loads_with_auto_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    path = resolve_model("builtin:micro")
    weights = next(p for p in (tmp_path.glob("micro-*/model.safetensors")))
    stamp = weights.stat().st_mtime_ns
    assert resolve_model("builtin:micro") == path
    assert weights.stat().st_mtime_ns == stamp, "a cached model must not be rebuilt"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    again, tokenizer = load_model("builtin:micro")
    ids = tokenizer("copy\nabc\n>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again.eval()(ids).logits)
    assert model.config.model_type == "llama"


def test_builtin_pretraining_is_deterministic(tmp_path, monkeypatch):
    states = []
    for folder in ("one", "two"):
        monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / folder))
        states.append(AutoModelForCausalLM.from_pretrained(resolve_model("builtin:micro")).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_changed_recipe_gets_a_cache_folder_of_its_own(tmp_path, monkeypatch):
    """An older build is never reused after the pre-training code changes (the spec alone is not enough)."""
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    spec = BUILTIN_MODELS["micro"]
    first = resolve_model("builtin:micro")
    assert first.endswith(f"micro-{spec.key()}")
    monkeypatch.setattr(models, "recipe_digest", lambda: "a training loop changed since")
    rebuilt = resolve_model("builtin:micro")
    assert rebuilt != first and sorted(p.name for p in tmp_path.glob("micro-*") if p.is_dir()) == sorted(
        [Path(first).name, Path(rebuilt).name])


def test_unknown_builtin_and_missing_path_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown builtin; choose one of builtin:tiny"):
        resolve_model("builtin:huge")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_model(str(tmp_path / "no-such-model"))
