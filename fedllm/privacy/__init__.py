"""Client-level differential privacy: clipping, noise, adaptive clipping and accounting."""

from fedllm.privacy.dp import (
    ACCOUNTANTS,
    Accountant,
    Update,
    central_noise_std,
    clip,
    clipped_fraction_bits,
    distributed_multiplier,
    distributed_noise_std,
    gaussian_noise,
    local_noise_std,
    next_clip_norm,
    noisy_fraction,
    update_noise_multiplier,
    update_norm,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "Update",
    "central_noise_std",
    "clip",
    "clipped_fraction_bits",
    "distributed_multiplier",
    "distributed_noise_std",
    "gaussian_noise",
    "local_noise_std",
    "next_clip_norm",
    "noisy_fraction",
    "update_noise_multiplier",
    "update_norm",
]
