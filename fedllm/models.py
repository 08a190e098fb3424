"""Base model and tokenizer factory: the embedded default, or any Hugging Face causal LM.

`model = "builtin:tiny"` is a small Llama-architecture model with a character tokenizer, made
and pre-trained by fedllm on the warm-up tasks (never on the fine-tuning suite), saved in the
standard Hugging Face formats and cached per configuration, so only the first run pays for it.
Any other value is a Hugging Face model name or local path, loaded through the same calls.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedllm.data.tasks import WARMUP_TASKS, generate
from fedllm.gguf_models import converted, is_gguf_model

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture and pre-training recipe of an embedded model; its hash keys the cache."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 128
    pretrain_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """The spec, the source of the code that builds the model and torch's version: a changed
        recipe builds afresh instead of silently reusing a cache made by an older one."""
        blob = json.dumps({**asdict(self), "recipe": recipe_digest(), "torch": torch.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(),
    # seconds to build; for smoke tests of the plumbing, not for accuracy
    "micro": BuiltinSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, pretrain_steps=20, batch_size=16),
    "micro-4l": BuiltinSpec(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, pretrain_steps=20, batch_size=16),
    # tiny's width with 8 layers: a server model that emulators of 1/2 and 1/4 of its layers can stand in for
    "tiny-8l": BuiltinSpec(num_layers=8),
}


def cache_dir() -> Path:
    """Where embedded models live: $FEDLLM_CACHE, else the user cache folder."""
    root = os.environ.get("FEDLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fedllm"
    )
    return Path(root)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with pad/bos/eos/unk."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@functools.cache
def recipe_digest() -> str:
    """SHA-256 of the source of everything pre-training reads: tokenizer, architecture, training
    loop and the warm-up tasks."""
    from fedllm import train
    from fedllm.data import format as prompt_format, tasks

    parts = (char_tokenizer, builtin_config, pretrain_builtin, train.encode, train.collate, train._lr_factor,
             train.train_steps, tasks, prompt_format)
    return hashlib.sha256("".join(inspect.getsource(part) for part in parts).encode()).hexdigest()


def builtin_config(spec: BuiltinSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def pretrain_builtin(spec: BuiltinSpec, out_dir: Path) -> None:
    """Train the embedded model from scratch on the warm-up tasks and save it to `out_dir`."""
    from fedllm.data.format import Prompter
    from fedllm.train import encode, train_steps  # train imports models for types only

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    tokenizer = char_tokenizer()
    model = LlamaForCausalLM(builtin_config(spec, tokenizer))
    corpus = generate(WARMUP_TASKS, per_task=2000, seed=spec.seed)
    data = encode(Prompter(tokenizer), corpus, spec.max_positions)
    started = time.perf_counter()

    def report(step: int, loss: float) -> None:
        if step % 100 == 0 or step == spec.pretrain_steps:
            log.info("pre-training the builtin model: step %d/%d, loss %.3f, %.0f s",
                     step, spec.pretrain_steps, loss, time.perf_counter() - started)

    loss = train_steps(
        model, data, steps=spec.pretrain_steps, batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, seed=spec.seed, warmup_steps=100, decay=True,
        pad_id=tokenizer.pad_token_id, on_step=report,
    )
    log.info("pre-trained builtin model in %.0f s, final loss %.3f", time.perf_counter() - started, loss)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fedllm_builtin.json").write_text(json.dumps({**asdict(spec), "final_loss": loss}, indent=2))


def resolve_model(name: str) -> str:
    """The path or hub name to load for `name`: a builtin model pre-trained and cached first, a GGUF
    file or packaged model converted and cached first (`fedllm.gguf_models`), else `name` itself."""
    if is_gguf_model(name):
        return str(converted(name, cache_dir()))
    if not name.startswith(BUILTIN_PREFIX):
        return name
    variant = name[len(BUILTIN_PREFIX):]
    if variant not in BUILTIN_MODELS:
        raise ValueError(
            f"model {name!r}: unknown builtin; choose one of "
            f"{', '.join(BUILTIN_PREFIX + v for v in BUILTIN_MODELS)} or a Hugging Face name/path"
        )
    spec = BUILTIN_MODELS[variant]
    target = cache_dir() / f"{variant}-{spec.key()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            log.info("pre-training %s once into %s (cached for later runs)", name, target)
            staging = target.with_name(target.name + f".tmp{os.getpid()}")
            staging.mkdir(parents=True, exist_ok=True)
            pretrain_builtin(spec, staging)
            staging.rename(target)
    return str(target)


def builtin_weights_digest(name: str) -> str | None:
    """The first 12 hex digits of the SHA-256 of a builtin model's cached weights, so a result names
    the build it was computed on (a cache rebuilt elsewhere may differ); None for other models."""
    if not name.startswith(BUILTIN_PREFIX):
        return None
    return hashlib.sha256((Path(resolve_model(name)) / "model.safetensors").read_bytes()).hexdigest()[:12]


def _unloadable(name: str, error: OSError) -> ValueError:
    return ValueError(f"model {name!r} could not be loaded ({error}); give a local folder saved with "
                      f"save_pretrained, a reachable Hugging Face name, a .gguf file, or 'builtin:tiny'")


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base model and tokenizer in float32 on `device`, ready for adapters."""
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as error:
        raise _unloadable(name, error) from error
    return model.to(device), _with_pad(tokenizer)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` without its weights (an emulator client never loads the full
    model); for a builtin model not built on this machine, the same character tokenizer made afresh."""
    if name.startswith(BUILTIN_PREFIX) and name[len(BUILTIN_PREFIX):] in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name[len(BUILTIN_PREFIX):]]
        folder = cache_dir() / f"{name[len(BUILTIN_PREFIX):]}-{spec.key()}"
        return AutoTokenizer.from_pretrained(folder) if (folder / "config.json").exists() else char_tokenizer()
    try:
        return _with_pad(AutoTokenizer.from_pretrained(resolve_model(name)))
    except OSError as error:
        raise _unloadable(name, error) from error


def pick_device() -> torch.device:
    """The GPU when one exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
