"""The client's side of secure aggregation.

Flower's `secaggplus_mod` runs the SecAgg+ stages (key agreement, secret sharing, masking,
unmasking) around the train handler; in the masking stage it calls `secure_reply` and masks
what that returns, so the server only ever receives masked vectors. The legacy FitIns/FitRes
record layout is what the mod speaks (Flower 1.42). The client trains, then sends the operator's
client step of its update (for linear operators with no client step, the upload's additive
coordinates; otherwise the model-space update trimmed or dropped as the operator would, a DARE
drop mask drawn from this client's secret randomness).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client import faults
from client.privacy import privatize, released_metrics, reported_examples
from fedllm.config import RunConfig
from fedllm.core.local import MODEL_BUILDS, NodeSettings, local_round, worker_for
from fedllm.privacy.secure import IDENTITY_STEP, client_step
from fedllm.seeds import secret_int


def secure_reply(content: RecordDict, cfg: RunConfig, node: NodeSettings) -> RecordDict:
    """The FitRes content that Flower's SecAgg+ mod masks: the client step's vector, the example
    weight and the metrics (under DP the weight is 1 and metrics that depend on the data are
    withheld: ε covers neither)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config, arrays = fitins.config, parameters_to_ndarrays(fitins.parameters)
    names = str(config["upload-names"]).split("\n")
    server_round = int(config["server-round"])
    faults.apply(cfg, node.partition_id, ArrayRecord(), {})  # crash / hang: a client that drops out
    received = {k: torch.from_numpy(np.array(a)) for k, a in zip(str(config["state-names"]).split("\n"), arrays)}
    result = local_round(cfg, node, worker_for(cfg), received, server_round, cfg.local_steps)
    values = step_values(cfg, result.update, int(config["lora-rank"]), server_round, node.partition_id)
    values, _ = privatize(cfg, values, server_round, node.partition_id, min_survivors=int(config["min-survivors"]))
    vector, clipped = within_range([values[name].numpy() for name in names], cfg.secagg_clipping_range)
    metrics = released_metrics(cfg, {"train_loss": float(result.loss), "train-seconds": result.seconds,
                                     "secure-clipped": clipped, "pid": os.getpid(),
                                     "model-builds": MODEL_BUILDS.get(cfg.model, 0)})
    weight = reported_examples(cfg, result.examples)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vector), weight, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def step_values(
    cfg: RunConfig, upload: dict[str, torch.Tensor], rank: int, server_round: int, partition_id: int,
) -> dict[str, torch.Tensor]:
    """The operator's client step: the additive upload itself for plain averages, else the
    model-space update trimmed/dropped by the operator on this client alone (random drops seeded
    from `secret-seed`, else the OS: the server must not be able to regenerate them)."""
    if cfg.aggregation in IDENTITY_STEP:
        return upload
    update = worker_for(cfg).method.additive_update(upload, rank)
    params = cfg.aggregation_params()
    return {name: client_step(cfg.aggregation, tensor, params, secret_int(cfg.secret_seed, cfg.seed, "drop",
                                                                          server_round, partition_id, name) % 2**31)
            for name, tensor in update.items()}


def within_range(vector: list[np.ndarray], limit: float) -> tuple[list[np.ndarray], int]:
    """SecAgg+ silently clips to ±limit; clip here instead and count what was clipped."""
    clipped = sum(int((np.abs(v) > limit).sum()) for v in vector)
    return [np.clip(v, -limit, limit).astype(np.float32) for v in vector], clipped
