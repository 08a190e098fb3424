"""Emulator clients, server side: what each node trains on, built once per run from the base
weights `W0` (optionally distilled), sent to each node once, and the renaming between its layers
and the server's.

A node's `client-model` (its node-config, else the run's, cycled over partitions) is reported in
the start-up query. An emulator node receives every round only the state of the layers it keeps,
under its own layer names, and its upload is renamed back before it becomes an update `τ_k` over
those layers; the aggregator then merges each module over the clients that trained it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from fedllm.config import RunConfig
from fedllm.data import WARMUP_TASKS
from fedllm.data.tasks import generate
from fedllm.distill import distill_middle_layers, gap_loss
from fedllm.emulator import (
    EMULATOR_RECORD, WEIGHTS_RECORD, ClientModel, Emulator, LayerMap, build_emulator, decoder_layers, instantiate,
    with_state,
)
from fedllm.methods import Sent
from fedllm.data.format import Prompter
from fedllm.train import encode
from fedllm.core.server_model import ServerModel

log = logging.getLogger(__name__)

DISTILL_LEARNING_RATE = 1e-3
DISTILL_BATCH = 32
DISTILL_EXAMPLES_PER_TASK = 300  # warm-up examples (public) per task; a tenth more are held out to measure the gap


@dataclass(frozen=True)
class EmulatorBuild:
    """An emulator made for this run and what making it cost and changed."""

    emulator: Emulator
    seconds: float
    gap_before: float | None = None  # free-running hidden-state gap to the full model, before distillation
    gap_after: float | None = None

    def report(self, full_bytes: int) -> dict[str, Any]:
        return {
            "layers": list(self.emulator.layer_map.kept), "digest": self.emulator.digest,
            "base_bytes": self.emulator.num_bytes, "share_of_full_model": self.emulator.num_bytes / full_bytes,
            "build_seconds": self.seconds, "distill_gap_before": self.gap_before, "distill_gap_after": self.gap_after,
        }


def restrict(sent: Sent, layer_map: LayerMap) -> Sent:
    """The part of `sent` an emulator trains: the tensors of its adapted layers (full-model names)."""
    return replace(sent, state=layer_map.adapted_only(sent.state), reference=layer_map.adapted_only(sent.reference))


class EmulatorFleet:
    """The run's emulators by client model, and which node holds which (sent this run)."""

    def __init__(self, cfg: RunConfig, server: ServerModel) -> None:
        self.cfg, self.server = cfg, server
        self.builds: dict[str, EmulatorBuild] = {}
        self.holders: dict[int, str] = {}  # node id -> digest of the emulator it was sent
        unique = {t.data_ptr(): t for t in server.model.state_dict().values()}  # tied weights once
        self.full_bytes = sum(t.numel() * t.element_size() for t in unique.values())
        for spec in cfg.client_models():  # the run's own, up front; a node's node-config one when it joins
            self.layer_map(str(spec))

    def layer_map(self, spec: str) -> LayerMap | None:
        """The emulator layers of a client model (None: the full model or another one), built on first use."""
        model = ClientModel.parse(spec)
        if not model.is_emulator:
            return None
        if spec not in self.builds:
            self.builds[spec] = self.build(model)
        return self.builds[spec].emulator.layer_map.with_adapters(self.cfg.emulator_adapters)

    def build(self, model: ClientModel) -> EmulatorBuild:
        started = time.perf_counter()
        base = self.server.method.base_state_dict(self.server.model)
        kept = model.kept_layers(len(decoder_layers(self.server.model)[1]))
        emulator = build_emulator(self.server.model, base, kept)
        log.info("emulator %s: layers %s of the base model, %.1f MiB", model, list(kept), emulator.num_bytes / 2**20)
        if not self.cfg.emulator_distill_steps or len(kept) < 3:
            return EmulatorBuild(emulator, time.perf_counter() - started)
        return self.distilled(emulator, base, started)

    def distilled(self, emulator: Emulator, base: dict, started: float) -> EmulatorBuild:
        """`emulator` with its middle layers distilled on the warm-up tasks (public data)."""
        tokenizer, steps = self.server.tokenizer, self.cfg.emulator_distill_steps
        examples = generate(WARMUP_TASKS, per_task=DISTILL_EXAMPLES_PER_TASK * 11 // 10, seed=self.cfg.seed)
        data = encode(Prompter(tokenizer, self.cfg.prompt_format), examples, 512)
        held_out, train = data[::11], [d for i, d in enumerate(data) if i % 11]
        teacher = copy.deepcopy(self.server.model)
        teacher.load_state_dict(base, strict=False)
        student = instantiate(emulator, next(teacher.parameters()).device)
        before = gap_loss(teacher, student, emulator.layer_map, held_out, tokenizer.pad_token_id)

        def progress(step: int, loss: float) -> None:
            if step % 100 == 0 or step == steps:
                log.info("distilling emulator layers %s: step %d/%d, loss %.4f", list(emulator.layer_map.kept),
                         step, steps, loss)

        distill_middle_layers(teacher, student, emulator.layer_map, train, steps=steps, batch_size=DISTILL_BATCH,
                              learning_rate=DISTILL_LEARNING_RATE, seed=self.cfg.seed, pad_id=tokenizer.pad_token_id,
                              on_step=progress)
        after = gap_loss(teacher, student, emulator.layer_map, held_out, tokenizer.pad_token_id)
        log.info("distilled emulator %s: hidden-state gap %.4f -> %.4f", list(emulator.layer_map.kept), before, after)
        return EmulatorBuild(with_state(emulator, student.state_dict()), time.perf_counter() - started, before, after)

    def records(self, node_id: int, spec: str, state: dict) -> dict[str, Any]:
        """A train message's records for `node_id`: its adapter state (an emulator's under its own
        layer names, with the emulator's identity, and the weights the first time)."""
        layer_map = self.layer_map(spec)
        if layer_map is None:
            return {"arrays": ArrayRecord(state)}
        emulator = self.builds[spec].emulator
        identity: dict[str, Any] = {"digest": emulator.digest}
        records = {"arrays": ArrayRecord(layer_map.emulator_names(layer_map.adapted_only(state)))}
        if self.holders.get(node_id) != emulator.digest:  # the first time: what to build it from
            identity |= {"prefix": layer_map.prefix, "kept": list(layer_map.kept), "config": emulator.config_json}
            records[WEIGHTS_RECORD] = ArrayRecord(emulator.state)
            self.holders[node_id] = emulator.digest
        return {**records, EMULATOR_RECORD: ConfigRecord(identity)}

    def forget(self, node_id: int) -> None:
        """The node failed a round: it may have lost its emulator, so send it again next time."""
        self.holders.pop(node_id, None)

    def report(self) -> dict[str, Any]:
        """What summary.json says about the client models of the run: the full one, and each emulator."""
        layers = len(decoder_layers(self.server.model)[1])
        full = {"layers": list(range(layers)), "base_bytes": self.full_bytes, "share_of_full_model": 1.0}
        return {"full": full, **{spec: build.report(self.full_bytes) for spec, build in self.builds.items()}}
