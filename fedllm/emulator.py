"""Emulators: small client models made from the server's model (Offsite-Tuning, Xiao et al. 2023,
arXiv 2302.04870).

An emulator keeps a subset of the base model's decoder layers, always the first and the last
and an even spread of the middle ones, with their weights unchanged, and drops the rest. A
client that cannot hold the server's model trains adapters on its emulator. fedllm's updates are
per module, so emulator layer `i` is full-model layer `kept[i]`: `LayerMap` renames the client's
update to the full model's module names and it merges straight into the server model.

The server sends an emulator once per run, with a SHA-256 digest of its config and weights; the
client checks the digest and keeps the emulator (in memory, and on disk for processes that start
afresh per message).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from fedllm.settings import ConfigError, Settings, choice, setting

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FULL = "full"
EMULATOR_PREFIX = "emulator:"
ADAPTER_PLACES = ("kept", "ends")  # emulator-adapters: where an emulator client's adapters go
# A train message names its emulator in EMULATOR_RECORD (the digest; the first time also its layers and
# config) and, in a node's first message only, carries its base weights in WEIGHTS_RECORD.
EMULATOR_RECORD = "emulator"
WEIGHTS_RECORD = "emulator-weights"


class EmulatorError(ValueError):
    """An emulator that cannot be built, or whose weights do not match their digest."""


@dataclass(frozen=True)
class ClientModel:
    """What a client trains on: the full base model, an emulator keeping `keep` of its decoder
    layers (a fraction in (0, 1] of them, or a count >= 2), or `other`, another model altogether
    (a builtin, a packaged model, a .gguf, a path or a hub name: cooperation, `fedllm.cooperation`)."""

    keep: float | int | None = None
    other: str | None = None

    @classmethod
    def parse(cls, text: str) -> ClientModel:
        """`'full'`, `'emulator:<keep>'` (a number with a decimal point is a fraction), or another model."""
        text = text.strip()
        if text == FULL:
            return cls()
        if not text.startswith(EMULATOR_PREFIX):
            if not text or any(c.isspace() for c in text):
                raise ValueError(f"{text!r} is not 'full', 'emulator:<keep>' or a model name or path")
            return cls(other=text)
        value = text[len(EMULATOR_PREFIX):]
        try:
            keep: float | int = float(value) if value and "." in value else int(value or "")
        except ValueError:
            keep = 0
        if isinstance(keep, float) and 0 < keep <= 1 or isinstance(keep, int) and keep >= 2:
            return cls(keep)
        raise ValueError(f"{text!r} is not 'emulator:<keep>' with <keep> a fraction in (0, 1] "
                         f"(e.g. emulator:0.5) or a layer count >= 2 (e.g. emulator:4)")

    @property
    def is_full(self) -> bool:
        return self.keep is None and self.other is None

    @property
    def is_emulator(self) -> bool:
        return self.keep is not None

    def __str__(self) -> str:
        return self.other or (FULL if self.keep is None else f"{EMULATOR_PREFIX}{self.keep}")

    def kept_layers(self, num_layers: int) -> tuple[int, ...]:
        """The full model's layers this client model runs, in order."""
        if self.keep is None:
            return tuple(range(num_layers))
        count = max(2, round(self.keep * num_layers)) if isinstance(self.keep, float) else self.keep
        if count > num_layers:
            raise EmulatorError(f"client-model {self} keeps {count} layers but the base model has {num_layers}")
        return uniform_layers(num_layers, count)


def parse_client_models(value: str) -> list[ClientModel]:
    """`client-model` as a list, cycled over partitions in simulation."""
    return [ClientModel.parse(part) for part in value.split(",") if part.strip()]


def uniform_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """The first and the last of `num_layers` layers, and `count − 2` middle ones spread evenly
    (each the centre of an equal share of the middle layers)."""
    if not 2 <= count <= num_layers:
        raise EmulatorError(f"an emulator keeps between 2 and {num_layers} layers, not {count}")
    inner, middle = count - 2, num_layers - 2
    picks = [1 + int((j + 0.5) * middle / inner) for j in range(inner)]
    return (0, *picks, num_layers - 1)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted name and the module list of a causal LM's decoder layers (Llama's
    `model.layers`, GPT-2's `transformer.h`): the module list as long as the config's layer count."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return name, module
    raise EmulatorError(f"{type(model).__name__} has no list of {count} decoder layers to make an emulator from")


@functools.lru_cache(maxsize=8)
def _layer_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"(^|\.){re.escape(prefix)}\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class LayerMap:
    """Names between an emulator and its full model: emulator layer `i` is full layer `kept[i]`.

    Works on any name that contains the decoder layers' path: module names, state-dict keys,
    peft's `base_model.model.`-prefixed keys.
    """

    prefix: str  # the decoder layers' dotted path, e.g. "model.layers"
    kept: tuple[int, ...]
    adapted: tuple[int, ...] = ()  # the full-model layers that carry adapters; () = every kept layer

    def _layer(self, name: str) -> re.Match | None:
        """Where `name` gives its decoder-layer index (group 2), or None outside the layers."""
        return _layer_pattern(self.prefix).search(name)

    def _renamed(self, name: str, index_of) -> str | None:  # noqa: ANN001 - int -> int | None
        match = self._layer(name)
        if match is None:
            return name  # not inside a decoder layer
        index = index_of(int(match.group(2)))
        if index is None:
            return None
        return f"{name[: match.start(2)]}{index}{name[match.end(2):]}"

    def to_full(self, name: str) -> str:
        """The full model's name for an emulator name."""
        renamed = self._renamed(name, lambda i: self.kept[i] if i < len(self.kept) else None)
        if renamed is None:
            raise EmulatorError(f"{name!r} names emulator layer beyond its {len(self.kept)} layers")
        return renamed

    def to_emulator(self, name: str) -> str | None:
        """The emulator's name for a full-model name; None for a layer the emulator dropped."""
        return self._renamed(name, lambda i: self.kept.index(i) if i in self.kept else None)

    def full_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.to_full(name): tensor for name, tensor in tensors.items()}

    def emulator_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of the kept layers (and of no layer), under the emulator's names."""
        renamed = ((self.to_emulator(name), tensor) for name, tensor in tensors.items())
        return {name: tensor for name, tensor in renamed if name is not None}

    def adapts(self, name: str) -> bool:
        """Whether a full-model name belongs to a layer this emulator's client trains (or to none)."""
        match = self._layer(name)
        return match is None or int(match.group(2)) in (self.adapted or self.kept)

    def adapted_only(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors (full-model names) of the layers this emulator's client trains."""
        return {name: tensor for name, tensor in tensors.items() if self.adapts(name)}

    def with_adapters(self, where: str) -> LayerMap:
        """The map with adapters on every kept layer (`'kept'`) or, as Offsite-Tuning's adapter,
        on the first and the last layer only (`'ends'`): the exact copies of the full model's."""
        return replace(self, adapted=self.kept if where == "kept" else (self.kept[0], self.kept[-1]))


@dataclass(frozen=True)
class Emulator:
    """An emulator as the server sends it: its Hugging Face config (JSON), base weights, the
    full-model layers it keeps, and the digest that identifies it."""

    config_json: str
    state: dict[str, torch.Tensor]
    layer_map: LayerMap
    digest: str

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def digest_of(config_json: str, kept: tuple[int, ...], state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config, the kept layers and every tensor (name, dtype, shape, bytes)."""
    hasher = hashlib.sha256(config_json.encode())
    hasher.update(json.dumps(kept).encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def build_emulator(model: PreTrainedModel, state: dict[str, torch.Tensor], kept: tuple[int, ...]) -> Emulator:
    """The emulator of `model` (architecture) with base weights `state` (the model's own state
    dict, or one with its original weights restored) that keeps the layers `kept`."""
    prefix, _ = decoder_layers(model)
    layer_map = LayerMap(prefix, kept)
    config = model.config.to_dict()
    config["num_hidden_layers"] = len(kept)
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (sliding, full, ...)
        config["layer_types"] = [config["layer_types"][i] for i in kept]
    config_json = json.dumps(config, sort_keys=True, default=str)
    emulator_state = {name: t.detach().clone() for name, t in layer_map.emulator_names(state).items()}
    if model.config.to_dict().get("tie_word_embeddings"):
        emulator_state.pop("lm_head.weight", None)  # the input embedding, again: not sent twice
    return Emulator(config_json, emulator_state, layer_map, digest_of(config_json, kept, emulator_state))


def with_state(emulator: Emulator, state: dict[str, torch.Tensor]) -> Emulator:
    """The same emulator with new base weights (e.g. distilled), and their digest."""
    state = {name: t.detach().clone() for name, t in state.items() if name in emulator.state}
    return Emulator(emulator.config_json, state, emulator.layer_map,
                    digest_of(emulator.config_json, emulator.layer_map.kept, state))


def verified(config_json: str, kept: tuple[int, ...], prefix: str, state: dict[str, torch.Tensor], digest: str) -> Emulator:
    """An emulator received or read back, after checking its digest."""
    actual = digest_of(config_json, kept, state)
    if actual != digest:
        raise EmulatorError(f"emulator weights do not match their digest (expected {digest[:12]}, got {actual[:12]}): "
                            "they were corrupted on the way or on disk")
    return Emulator(config_json, state, LayerMap(prefix, kept), digest)


def instantiate(emulator: Emulator, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The emulator as a model with its base weights, in float32 on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM  # not at import: the config parser needs none of it

    settings = json.loads(emulator.config_json)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = getattr(config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(emulator.state, strict=False)
    if unexpected or [m for m in missing if not (tied and m.endswith("lm_head.weight"))]:
        raise EmulatorError(f"emulator weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()


def save_cached(emulator: Emulator, root: Path) -> Path:
    """Write the emulator under `root/<digest>/` (atomically: a folder that exists is complete)."""
    target = root / emulator.digest
    if target.exists():
        return target
    staging = root / f".{emulator.digest}.tmp{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in emulator.state.items()}, str(staging / "model.safetensors"))
    meta = {"config": emulator.config_json, "kept": list(emulator.layer_map.kept), "prefix": emulator.layer_map.prefix}
    (staging / "emulator.json").write_text(json.dumps(meta))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        if not target.exists():
            raise
    return target


def load_cached(root: Path, digest: str) -> Emulator | None:
    """The emulator with `digest` from `root`, checked; None if it is not there."""
    folder = root / digest
    if not (folder / "emulator.json").exists():
        return None
    meta = json.loads((folder / "emulator.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    return verified(meta["config"], tuple(meta["kept"]), meta["prefix"], state, digest)


def _is_client_model_list(value: str) -> bool:
    try:
        return bool(parse_client_models(value))
    except ValueError:
        return False


@dataclass(frozen=True)
class EmulatorSettings(Settings):
    """What clients train on: the base model or an emulator of it (Offsite-Tuning)."""

    client_model: str = setting(
        "client-model", "full", _is_client_model_list,
        "'full', 'emulator:<keep>' (<keep> a fraction in (0, 1] or a layer count >= 2), another model (as `model` "
        "takes it), or a comma-separated list",
        "what clients train on: the base model, an emulator keeping the first, last and evenly spread middle "
        "layers (Offsite-Tuning), or another model (needs cooperation); a list cycles over partitions (a node's "
        "node-config client-model wins)",
    )
    emulator_distill_steps: int = setting(
        "emulator-distill-steps", 0, lambda v: v >= 0, "an integer >= 0 (0: off)",
        "emulators: steps of layer-wise distillation of their middle layers on the public warm-up tasks, on the server",
    )
    emulator_adapters: str = choice(
        "emulator-adapters", "kept", ADAPTER_PLACES,
        "emulators: adapters on every kept layer, or on the first and last only (Offsite-Tuning's adapter: the "
        "layers that are exact copies of the full model's)",
    )

    def check(self) -> None:
        """Emulators carry per-layer adapters, merged per layer over the clients that have it."""
        if not any(model.is_emulator for model in self.client_models()):
            if self.emulator_distill_steps or self.emulator_adapters != "kept":
                raise ConfigError("run-config emulator-distill-steps and emulator-adapters need emulator clients "
                                  "(client-model 'emulator:<keep>'); leave them at 0 and 'kept' with client-model 'full'")
        elif why := self.emulator_refusal():
            raise ConfigError(f"run-config client-model {self.client_model!r} (emulator clients) {why}")

    def emulator_refusal(self) -> str | None:
        """Why this run cannot have emulator clients, or None if it can."""
        from fedllm.methods import METHODS

        layered = " or ".join(name for name, method in METHODS.items() if method.adapts_layers)
        problems = {
            f"peft-method {self.peft_method!r}": not METHODS[self.peft_method].adapts_layers,
            "secure-aggregation": self.secure_aggregation,
            f"dp {self.dp!r}": self.dp != "none",
            f"baseline {self.baseline!r}": self.baseline != "none",
        }
        if bad := [what for what, set_ in problems.items() if set_]:
            return (f"does not combine with {', '.join(bad)}: emulators take peft-method {layered}, and their "
                    "updates of some layers only are merged per layer, which secure sums, DP's sensitivity bound and "
                    "the baselines do not do")
        return None

    def client_models(self) -> list[ClientModel]:
        """`client-model` as a list, cycled over partitions."""
        return parse_client_models(self.client_model)

    def client_model_for_partition(self, partition_id: int) -> str:
        """This partition's client model in simulation (a node's node-config client-model wins)."""
        models = self.client_models()
        return str(models[partition_id % len(models)])
