"""Differential privacy on the client: clip the update and add this client's share of noise.

Local DP: each upload carries N(0, (2zC)²) of its own (sensitivity 2C: any two inputs of the
client). Central DP under secure aggregation: the server never sees an update, so each client adds
N(0, (zC)²/T), T the fewest clients the secure sum can complete with, and any completed sum carries
at least N(0, (zC)²), the noise central DP puts on the sum. Clipping and noise act on the upload's
additive coordinates (the model-space update; for FFA-LoRA the change of B, whose model-space
image is post-processing of what is released). Noise comes from the OS, or, for reproducible
experiments, from `secret-seed` with its own stream per run seed, round and client (never repeated).
"""

from __future__ import annotations

import torch

from fedllm.config import RunConfig
from fedllm.privacy import clip, distributed_noise_std, gaussian_noise, local_noise_std
from fedllm.seeds import secret_generator


def privatize(
    cfg: RunConfig, update: dict[str, torch.Tensor], server_round: int, partition_id: int, min_survivors: int = 1,
) -> tuple[dict[str, torch.Tensor], float]:
    """The clipped, noised update and its norm before clipping (unchanged without client-side DP)."""
    if not cfg.client_side_dp():
        return update, float("nan")
    clipped, norm = clip(update, cfg.dp_clip_norm)
    if cfg.dp == "local":
        std = local_noise_std(cfg.dp_clip_norm, cfg.dp_noise_multiplier)
    else:
        std = distributed_noise_std(cfg.dp_clip_norm, cfg.dp_noise_multiplier, min_survivors)
    generator = secret_generator(cfg.secret_seed, cfg.seed, "client-noise", server_round, partition_id)
    noise = gaussian_noise({k: t.shape for k, t in clipped.items()}, std, generator)
    return {k: clipped[k] + noise[k] for k in clipped}, norm


def reported_examples(cfg: RunConfig, examples: int) -> int:
    """The example count to tell the server: under DP 1, since weights are uniform there and ε does
    not cover the count."""
    return 1 if cfg.dp != "none" else examples


DATA_METRICS = ("train_loss", "train-seconds", "secure-clipped")  # depend on the client's data; ε covers none


def released_metrics(cfg: RunConfig, metrics: dict) -> dict:
    """The reply metrics a client may send: under DP without those that depend on its data."""
    if cfg.dp == "none":
        return metrics
    return {key: value for key, value in metrics.items() if key not in DATA_METRICS}
