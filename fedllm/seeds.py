"""Every seed a run derives, in one place.

Public seeds come from the run config's `seed`: anyone who has the config can replay them, which
is what reproducible runs need (sampling, re-factoring, operators, local training, FFA-LoRA's
frozen A). Secret draws (DP noise and sampling, secure DARE masks) must be unpredictable to the
server: they come from the OS, or, for reproducible experiments, from `secret-seed`, one stream
per run seed, purpose and round so a resumed run draws what the uninterrupted run drew and no draw
repeats another. (The public seed only tells streams apart; without `secret-seed` they are unknown.)
"""

from __future__ import annotations

import hashlib
import random
import secrets
import zlib

import torch


def sampling_rng(seed: int, server_round: int) -> random.Random:
    """The server's choice of nodes in a round (public: `fraction-train` sampling is reproducible)."""
    return random.Random(f"{seed}:sample:{server_round}")


def validation_seed(seed: int) -> int:
    """Which training examples are held out as the validation split (before partitioning)."""
    return seed * 15_485_863 + 17


def refactor_seed(seed: int, server_round: int) -> int:
    """Random directions of the rank-r re-factoring of ΔW_g sent in a round (same in a replay)."""
    return seed * 7919 + server_round


def operator_seed(seed: int, server_round: int, module_index: int) -> int:
    """A randomized operator's (DARE, DELLA) seed for one module in one round."""
    return (seed * 1_000_003 + server_round * 10_007 + module_index) % 2**31


def local_training_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A client's batch order and dropout in one round."""
    return seed * 100_003 + server_round * 1009 + partition_id


def frozen_a_seed(seed: int, module: str) -> int:
    """FFA-LoRA's frozen A of a module, by its full name: the same on every client, emulator and server."""
    return zlib.crc32(f"{seed}:{module}".encode())


def secret_int(secret_seed: int | None, *labels: object) -> int:
    """63 bits nobody can predict: from the OS when `secret_seed` is None, else SHA-256 of the seed
    and `labels` (reproducible experiments; one independent stream per label)."""
    if secret_seed is None:
        return secrets.randbits(63)
    text = ":".join(str(part) for part in (secret_seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def secret_generator(secret_seed: int | None, *labels: object) -> torch.Generator:
    """A CPU generator seeded with `secret_int(secret_seed, *labels)`; never from the public `seed`."""
    return torch.Generator().manual_seed(secret_int(secret_seed, *labels))


def public_prompts_rng(seed: int, server_round: int) -> random.Random:
    """Which public prompts a round's cooperation uses (public, like the prompts themselves)."""
    return random.Random(f"{seed}:public:{server_round}")


def knowledge_noise_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The noise a client adds to its answers on public prompts in one round (`knowledge-noise`)."""
    return seed * 100_043 + server_round * 1019 + partition_id


def server_distill_seed(seed: int, server_round: int) -> int:
    """The server's batch order when it distils the client models' knowledge in a round."""
    return seed * 100_019 + server_round * 1013
