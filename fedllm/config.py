"""The run configuration: every key, its default and its check, parsed once at the edge.

Flower hands the ServerApp and ClientApp `[tool.flwr.app.config]` merged with `--run-config`
overrides as a flat dict with hyphenated keys. `RunConfig.from_flower` turns it into a typed,
validated object; an unknown key or a bad value raises `ConfigError` naming the key and what it
accepts. `python -m fedllm.config` prints the table the README shows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedllm.emulator import ADAPTER_PLACES, ClientModel, parse_client_models
from fedllm.server_optim import OPTIMIZERS, ServerOptimizer
from fedllm.wire import UploadCodec


# Keys that may differ between a run and its resumption without changing its results.
RESULT_NEUTRAL_KEYS = (
    "output-dir", "num-server-rounds", "resume", "resume-from", "resume-round", "overwrite", "keep-checkpoints",
    "round-timeout",
    "fault-injection",  # a testing aid: a run that failed on injected faults may resume without them
    "audit-dir",
)

# Keys whose value must never reach an output (summary.json, checkpoints, study tables) nor the
# config digest written beside them (a short hash of a small integer is easily inverted).
SECRET_KEYS = ("secret-seed",)

LARGEST_INT = 2**31 - 1  # every integer setting is below this: seeds and counts derived from it stay in range
AUTO = "auto"
AUTO_NORM_RATIO = 3.0  # max-update-norm = 'auto': updates are scaled down to this multiple of the round's median norm

# Reference runs that show where federated training sits (fedllm/core/server_methods).
BASELINES = ("none", "centralized", "local-only")

# What `fault-injection` can make a partition's ClientApp do to its reply (see client/faults.py).
FAULT_KINDS = (
    "nan", "shape", "missing", "extra", "dtype", "norm", "examples-zero", "examples-absurd", "metrics-type",
    "crash", "hang", "query-rank", "query-missing", "query-examples",
)


class ConfigError(ValueError):
    """A run-config key is unknown or has a bad value."""


def _key(name: str, default: Any, check: Callable[[Any], bool], accepts: str, doc: str) -> Any:
    return field(default=default, metadata={"check": check, "accepts": accepts, "doc": doc, "key": name})


def _positive(value: Any) -> bool:
    return value > 0


def _is_rank_list(value: str) -> bool:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return all(p.isdigit() and int(p) > 0 for p in parts)


def _is_partition(value: str) -> bool:
    from fedllm.data.partition import parse_partition

    try:
        parse_partition(value)
    except ValueError:
        return False
    return True


def parse_faults(value: str) -> list[tuple[int, str]]:
    """`fault-injection` as (partition-id, kind) pairs; `ConfigError` naming the bad entry."""
    faults = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        partition, _, kind = (p.strip() for p in entry.partition(":"))
        if not partition.isdigit() or not kind:
            raise ConfigError(
                f"run-config fault-injection entry {entry!r} is not '<partition-id>:<kind>' "
                f"(e.g. '1:nan,2:shape'); kinds: {', '.join(FAULT_KINDS)}"
            )
        if kind not in FAULT_KINDS:
            raise ConfigError(
                f"run-config fault-injection entry {entry!r}: unknown kind {kind!r}; accepted kinds: {', '.join(FAULT_KINDS)}"
            )
        faults.append((int(partition), kind))
    return faults


def _is_fault_list(value: str) -> bool:
    parse_faults(value)  # raises ConfigError with the details
    return True


def _is_client_model_list(value: str) -> bool:
    try:
        return bool(parse_client_models(value))
    except ValueError:
        return False


def _is_method(value: str) -> bool:
    from fedllm.methods import METHODS

    return value in METHODS


def _is_prompt_init(value: str) -> bool:
    return value in ("", "vocab", "random") or (value.startswith("text:") and bool(value[len("text:"):].strip()))


def _is_operator(value: str) -> bool:
    from fedllm.merge import OPERATORS

    return value in OPERATORS


@dataclass(frozen=True)
class RunConfig:
    """Validated settings of one federated run (field names are the keys with '_' for '-')."""

    num_server_rounds: int = _key("num-server-rounds", 30, _positive, "an integer >= 1", "federated rounds")
    fraction_train: float = _key(
        "fraction-train", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]", "fraction of nodes sampled per round"
    )
    min_clients: int = _key("min-clients", 2, _positive, "an integer >= 1", "fewest nodes a round may train on")
    local_steps: int = _key("local-steps", 40, _positive, "an integer >= 1", "optimizer steps per client per round")
    batch_size: int = _key("batch-size", 16, _positive, "an integer >= 1", "examples per local step")
    learning_rate: float | None = _key(
        "learning-rate", None, _positive, "'' (the method's default) or a number > 0",
        "client AdamW learning rate (defaults: LoRA family 3e-3, prompt-tuning 0.3, prefix-tuning 0.1, p-tuning 0.03)",
    )
    peft_method: str = _key(
        "peft-method", "lora", _is_method, "lora, ffa-lora, prompt-tuning, prefix-tuning or p-tuning",
        "what clients train (docs/methods.md)",
    )
    lora_variant: str = _key(
        "lora-variant", "standard", lambda v: v in ("standard", "rslora", "dora"), "standard, rslora or dora",
        "lora: scaling alpha/r, alpha/√r (rsLoRA) or DoRA magnitudes; ffa-lora: standard or rslora",
    )
    num_virtual_tokens: int = _key(
        "num-virtual-tokens", 16, _positive, "an integer >= 1", "prompt methods: virtual tokens in front of the input",
    )
    prompt_init: str = _key(
        "prompt-init", "", _is_prompt_init, "'' (= 'vocab'), 'vocab', 'random' or 'text:<words>'",
        "prompt-tuning: initial prompt from sampled vocabulary embeddings, at random, or from a text",
    )
    upload_dtype: str = _key(
        "upload-dtype", "float32", lambda v: v in ("float32", "float16", "bfloat16"), "float32, float16 or bfloat16",
        "number format of client uploads on the wire (aggregation stays float32)",
    )
    upload_sparsity: float | None = _key(
        "upload-sparsity", None, lambda v: 0 < v < 1, "'' (dense) or a density in (0, 1)",
        "clients send only this fraction of update entries (largest first), with error feedback",
    )
    lora_rank: int = _key("lora-rank", 8, _positive, "an integer >= 1", "LoRA rank r of client adapters")
    lora_alpha: float = _key("lora-alpha", 16.0, _positive, "a number > 0", "LoRA alpha; scaling s = alpha / r")
    lora_dropout: float = _key("lora-dropout", 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)", "LoRA dropout")
    lora_target_modules: str = _key(
        "lora-target-modules", "", lambda v: True, "comma-separated module names, or '' for the architecture default",
        "layers that get adapters",
    )
    aggregation: str = _key(
        "aggregation", "weighted_average", _is_operator, "a name from fedllm.merge.OPERATORS",
        "merge operator applied to the clients' model-space updates",
    )
    aggregation_density: float | None = _key(
        "aggregation-density", None, lambda v: 0 < v <= 1, "'' (operator default) or a number in (0, 1]",
        "fraction of each update kept (ties, dare_*, magnitude_prune, breadcrumbs, della)",
    )
    aggregation_scale: float | None = _key(
        "aggregation-scale", None, _positive, "'' (operator default) or a number > 0", "scale of the merged update",
    )
    aggregation_gamma: float | None = _key(
        "aggregation-gamma", None, lambda v: 0 <= v < 1, "'' (operator default) or a number in [0, 1)",
        "breadcrumbs: fraction of largest entries dropped",
    )
    aggregation_epsilon: float | None = _key(
        "aggregation-epsilon", None, lambda v: 0 <= v < 1, "'' (operator default) or a number in [0, 1)",
        "della: spread of keep probabilities",
    )
    aggregation_beta: float | None = _key(
        "aggregation-beta", None, lambda v: 0 <= v < 0.5, "'' (operator default) or a number in [0, 0.5)",
        "trimmed_mean: fraction dropped at each end",
    )
    server_optimizer: str = _key(
        "server-optimizer", "none", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}", "step applied to the merged update (FedAvgM / FedOpt)",
    )
    server_learning_rate: float = _key(
        "server-learning-rate", 1.0, _positive, "a number > 0", "server step size η (adaptive optimizers: ~1e-3)"
    )
    server_momentum: float = _key("server-momentum", 0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", "momentum: μ")
    server_beta1: float = _key("server-beta1", 0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", "adagrad/yogi/adam: β1")
    server_beta2: float = _key("server-beta2", 0.99, lambda v: 0 <= v < 1, "a number in [0, 1)", "yogi/adam: β2")
    server_tau: float = _key("server-tau", 1e-3, _positive, "a number > 0", "adagrad/yogi/adam: τ")
    client_ranks: str = _key(
        "client-ranks", "", _is_rank_list, "'' or comma-separated ranks, e.g. '4,8,16'",
        "simulation: LoRA rank per partition, cycling (a node's node-config lora-rank wins)",
    )
    client_model: str = _key(
        "client-model", "full", _is_client_model_list,
        "'full', 'emulator:<keep>' (<keep> a fraction in (0, 1] or a layer count >= 2), or a comma-separated list",
        "what clients train on: the base model, or an emulator keeping the first, last and evenly spread middle "
        "layers (Offsite-Tuning); a list cycles over partitions (a node's node-config client-model wins)",
    )
    emulator_distill_steps: int = _key(
        "emulator-distill-steps", 0, lambda v: v >= 0, "an integer >= 0 (0: off)",
        "emulators: steps of layer-wise distillation of their middle layers on the public warm-up tasks, on the server",
    )
    emulator_adapters: str = _key(
        "emulator-adapters", "kept", lambda v: v in ADAPTER_PLACES, "kept or ends",
        "emulators: adapters on every kept layer, or on the first and last only (Offsite-Tuning's adapter: the "
        "layers that are exact copies of the full model's)",
    )
    baseline: str = _key(
        "baseline", "none", lambda v: v in BASELINES, "none, centralized or local-only",
        "reference runs: one client trains on all partitions pooled, for as many steps as a round's clients "
        "together (centralized), or every client trains alone and is scored on the test split (local-only)",
    )
    model: str = _key(
        "model", "builtin:tiny", lambda v: bool(v.strip()),
        "'builtin:tiny' (or tiny-8l, micro, micro-4l), a Hugging Face name or a local path",
        "base model",
    )
    dataset: str = _key(
        "dataset", "builtin", lambda v: bool(v.strip()),
        "'builtin', a local .json/.jsonl/.csv file, or 'hf:<name>'", "instruction data",
    )
    partition: str = _key(
        "partition", "dirichlet:0.5", _is_partition, "'iid', 'dirichlet:<alpha>' or 'pathological:<k>'",
        "how training data is split across clients",
    )
    train_per_task: int = _key("train-per-task", 400, _positive, "an integer >= 1", "built-in suite: training examples per task")
    test_per_task: int = _key("test-per-task", 40, _positive, "an integer >= 1", "built-in suite: test examples per task")
    test_fraction: float = _key(
        "test-fraction", 0.1, lambda v: 0 < v < 1, "a number in (0, 1)", "file datasets: share held out for evaluation"
    )
    seed: int = _key("seed", 0, lambda v: v >= 0, "an integer in [0, 2^31)", "seed of data, sampling and training")
    output_dir: str = _key("output-dir", "", lambda v: True, "a folder path, or '' for outputs/<timestamp>", "where results go")
    overwrite: bool = _key(
        "overwrite", False, lambda v: True, "true or false",
        "replace an earlier run in output-dir (without it, and without resume, such a folder is refused untouched)",
    )
    round_timeout: float = _key("round-timeout", 3600.0, _positive, "seconds > 0", "longest wait for a round's replies")
    secure_aggregation: bool = _key(
        "secure-aggregation", False, lambda v: True, "true or false",
        "clients' updates are summed under SecAgg+; the server sees only sums (docs/privacy.md)",
    )
    secagg_clipping_range: float = _key(
        "secagg-clipping-range", 8.0, _positive, "a number > 0",
        "secure aggregation: largest |value| sent (larger ones are clipped and counted)",
    )
    secagg_num_shares: float = _key(
        "secagg-num-shares", 1.0, lambda v: 0 < v <= 1, "a fraction in (0, 1]",
        "secure aggregation: share of the sampled clients each client's secrets are split among",
    )
    secagg_reconstruction_threshold: float = _key(
        "secagg-reconstruction-threshold", 0.6, lambda v: 0 < v <= 1, "a fraction in (0, 1]",
        "secure aggregation: share of the shares needed to unmask (more may drop out, at least 2 remain)",
    )
    dp: str = _key(
        "dp", "none", lambda v: v in ("none", "central", "local"), "none, central or local",
        "client-level differential privacy: noise on the sum (central) or on each upload (local)",
    )
    dp_clip_norm: float = _key(
        "dp-clip-norm", 1.0, _positive, "a number > 0", "DP: bound C on each client's update norm (initial C if adaptive)",
    )
    dp_noise_multiplier: float = _key(
        "dp-noise-multiplier", 1.0, lambda v: v >= 0, "a number >= 0", "DP: noise std z in units of C (z = 0: clip only, ε = ∞)",
    )
    dp_adaptive_clipping: bool = _key(
        "dp-adaptive-clipping", False, lambda v: True, "true or false",
        "DP central: adapt C towards a quantile of the update norms (Andrew et al. 2021)",
    )
    dp_target_quantile: float = _key(
        "dp-target-quantile", 0.5, lambda v: 0 < v < 1, "a number in (0, 1)", "DP adaptive clipping: share of updates left unclipped",
    )
    dp_clip_learning_rate: float = _key(
        "dp-clip-learning-rate", 0.2, _positive, "a number > 0", "DP adaptive clipping: step of the geometric update of C",
    )
    dp_count_noise: float | None = _key(
        "dp-count-noise", None, _positive, "'' (max(sampled clients / 20, z)) or a number > dp-noise-multiplier / 2",
        "DP adaptive clipping: noise std on the count of unclipped updates",
    )
    dp_delta: float = _key("dp-delta", 1e-5, lambda v: 0 < v < 1, "a number in (0, 1)", "DP: δ of the (ε, δ) guarantee")
    dp_target_epsilon: float | None = _key(
        "dp-target-epsilon", None, _positive, "'' (no limit) or a number > 0",
        "DP: stop, with outputs saved, before a round would take ε past this",
    )
    dp_sampling_amplification: bool = _key(
        "dp-sampling-amplification", False, lambda v: True, "true or false",
        "central DP without secure aggregation: sample each node with probability fraction-train from secret "
        "randomness (Poisson) and account with amplification by sampling",
    )
    dp_accountant: str = _key(
        "dp-accountant", "rdp", lambda v: v in ("rdp", "pld"), "rdp or pld", "DP: Google dp-accounting's RDP or PLD accountant",
    )
    secret_seed: int | None = _key(
        "secret-seed", None, lambda v: v >= 0, "'' (secret, from the OS) or an integer >= 0",
        "seed of what the server must not predict (DP noise and sampling, secure DARE/DELLA drop masks); "
        "set it only for reproducible experiments, and then keep it secret",
    )
    audit_dir: str = _key(
        "audit-dir", "", lambda v: True, "'' or a folder",
        "write every message the server receives there (what the server could read)",
    )
    max_update_norm: float | str | None = _key(
        "max-update-norm", AUTO, lambda v: v == AUTO or (not isinstance(v, str) and v > 0),
        "'auto', '' (off) or a number > 0",
        "bound on a client's model-space update norm ‖τ_k‖: 'auto' scales an update down to "
        f"{AUTO_NORM_RATIO:g}x the round's median norm (docs/threat-model.md); a number rejects updates above it",
    )
    max_weight_ratio: float | None = _key(
        "max-weight-ratio", 4.0, lambda v: v >= 1, "'' (off) or a number >= 1",
        "cap on a client's example-count weight, as a multiple of the round's median (claimed examples buy "
        "no more influence than that)",
    )
    max_client_rank: int = _key(
        "max-client-rank", 256, _positive, "an integer >= 1",
        "largest LoRA rank a node may report (also at most the smallest adapted layer's min(d_in, d_out))",
    )
    max_client_examples: int = _key(
        "max-client-examples", 10_000_000, _positive, "an integer >= 1",
        "largest training-example count a node may report; a node claiming more is left out",
    )
    fault_injection: str = _key(
        "fault-injection", "", _is_fault_list,
        f"'' or comma-separated <partition-id>:<kind>, kind one of {', '.join(FAULT_KINDS)}",
        "testing aid: the ClientApp of that partition corrupts its reply that way (e.g. '1:nan,2:shape')",
    )
    resume: bool = _key(
        "resume", False, lambda v: True, "true or false",
        "continue the run in output-dir from its last completed round",
    )
    resume_from: str = _key(
        "resume-from", "", lambda v: True, "'' or the folder of an earlier run",
        "continue that run from its last completed round (outputs go to output-dir, default the same folder)",
    )
    resume_round: int | None = _key(
        "resume-round", None, lambda v: v >= 0, "'' (the newest checkpoint) or a round >= 0 still kept",
        "resume: continue after this round instead, rolling back the rounds after it",
    )
    keep_checkpoints: int = _key(
        "keep-checkpoints", 3, _positive, "an integer >= 1", "checkpoints kept (the newest rounds'), for resume-round",
    )

    @classmethod
    def check_keys(cls, run_config: Mapping[str, Any]) -> None:
        """Raise `ConfigError` naming the first unknown key (values are checked by `from_flower`)."""
        known = {f.metadata["key"] for f in fields(cls)}
        for key in run_config:
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {', '.join(sorted(known))}")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse a Flower run config; unknown keys and bad values raise `ConfigError`."""
        cls.check_keys(run_config)
        by_key = {f.metadata["key"]: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            spec = by_key[key]
            value = values[spec.name] = _coerce(key, raw, spec.type, spec.metadata["accepts"])
            if value is not None and not spec.metadata["check"](value):
                raise ConfigError(f"run-config {key} = {raw!r} is not accepted; expected {spec.metadata['accepts']}")
        config = cls(**values)
        config.aggregation_params()  # an operator parameter the operator does not take is an error
        config.check_method_keys()
        config.check_secure_keys()
        config.check_dp_keys()
        config.check_baseline_keys()
        config.check_client_model_keys()
        if config.resume and not (config.output_dir or config.resume_from):
            raise ConfigError("resume = true needs output-dir set to the folder of the run to continue (or use resume-from)")
        if config.resume_round is not None and not (config.resume or config.resume_from):
            raise ConfigError("run-config resume-round needs resume = true (or resume-from)")
        if config.overwrite and (config.resume or config.resume_from):
            raise ConfigError("run-config overwrite = true replaces the earlier run; it does not combine with resume")
        return config

    def resumes(self, folder: Path) -> bool:
        """Whether this run continues the run in `folder` (`resume`, or `resume-from` naming it)."""
        return self.resume or (bool(self.resume_from) and Path(self.resume_from).expanduser().resolve() == folder)

    def aggregation_params(self) -> dict[str, Any]:
        """The `aggregation-<param>` keys that are set, as keyword arguments of the operator."""
        from fedllm.merge import OPERATOR_PARAMS

        accepted = OPERATOR_PARAMS[self.aggregation]
        params = {}
        for f in fields(self):
            key = f.metadata["key"]
            if not key.startswith("aggregation-") or getattr(self, f.name) is None:
                continue
            name = key[len("aggregation-"):]
            if name not in accepted:
                takes = [f"aggregation-{p}" for p in accepted if p != "seed"]
                raise ConfigError(
                    f"run-config {key!r} is not a parameter of aggregation {self.aggregation!r}; "
                    f"it takes {', '.join(takes) or 'no parameters'}"
                )
            params[name] = getattr(self, f.name)
        return params

    def check_method_keys(self) -> None:
        """Method keys that the chosen `peft-method` does not use are errors, not silently ignored."""
        lora_family = self.peft_method in ("lora", "ffa-lora")
        if not lora_family and self.lora_variant != "standard":
            raise ConfigError(f"run-config lora-variant = {self.lora_variant!r} needs peft-method lora or ffa-lora "
                              f"(peft-method is {self.peft_method!r})")
        if self.peft_method == "ffa-lora" and self.lora_variant == "dora":
            raise ConfigError("run-config lora-variant = 'dora' does not combine with peft-method 'ffa-lora' "
                              "(DoRA's magnitudes make the update non-linear); use standard or rslora")
        if self.prompt_init and self.peft_method != "prompt-tuning":
            raise ConfigError(f"run-config prompt-init applies to peft-method prompt-tuning only "
                              f"(peft-method is {self.peft_method!r}); leave it ''")

    def check_secure_keys(self) -> None:
        """What secure aggregation cannot combine with, refused before anything starts."""
        if not self.secure_aggregation:
            return
        from fedllm.privacy.secure import refusal

        if why := refusal(self.aggregation):
            raise ConfigError(f"run-config {why}")
        problems = {
            "upload-dtype": self.upload_dtype != "float32",
            "upload-sparsity": self.upload_sparsity is not None,
        }
        if bad := [key for key, set_ in problems.items() if set_]:
            raise ConfigError(f"run-config {', '.join(bad)} cannot be set with secure-aggregation = true: SecAgg+ "
                              "quantizes and masks every value itself, so leave them at their defaults")
        if self.max_update_norm not in (None, AUTO):
            raise ConfigError("run-config max-update-norm needs the server to see each update's norm, which secure "
                              "aggregation hides; bound updates with dp-clip-norm instead, or leave it ''")
        if len({int(r) for r in self.client_ranks.split(",") if r.strip()}) > 1:
            raise ConfigError("run-config client-ranks gives clients different ranks; secure aggregation sums the same "
                              "tensors from every client, so leave client-ranks '' (one lora-rank for all)")
        if self.min_clients < 2:
            raise ConfigError("run-config min-clients must be >= 2 with secure-aggregation = true (SecAgg+ masks "
                              "each update with the others')")

    def check_dp_keys(self) -> None:
        """DP needs a merge whose sensitivity is bounded by the clip norm: the (uniform) mean."""
        if self.dp == "none":
            if self.dp_sampling_amplification:
                raise ConfigError("run-config dp-sampling-amplification applies to dp = 'central' only")
            return
        if self.aggregation not in ("weighted_average", "task_arithmetic"):
            raise ConfigError(f"run-config dp = {self.dp!r} needs aggregation weighted_average or task_arithmetic (a mean "
                              f"of clipped updates has sensitivity C / K); {self.aggregation!r} has no such bound")
        if self.dp_adaptive_clipping and self.dp_count_noise is not None and 2 * self.dp_count_noise <= self.dp_noise_multiplier:
            raise ConfigError(f"run-config dp-count-noise = {self.dp_count_noise:g} would use up the whole budget of "
                              f"dp-noise-multiplier {self.dp_noise_multiplier:g}; it must exceed dp-noise-multiplier / 2")
        if self.dp_adaptive_clipping and (self.dp != "central" or self.secure_aggregation):
            raise ConfigError("run-config dp-adaptive-clipping needs dp = 'central' without secure aggregation (the "
                              "server must count the clients whose update norm is below C)")
        if self.dp_sampling_amplification and (self.dp != "central" or self.secure_aggregation):
            raise ConfigError("run-config dp-sampling-amplification needs dp = 'central' without secure aggregation: "
                              "amplification assumes a sampling nobody who sees the output can predict, and only the "
                              "trusted central server draws it (under secure aggregation the server it hides from "
                              "would choose the clients)")
        if self.dp_sampling_amplification and self.dp_adaptive_clipping:
            raise ConfigError("run-config dp-sampling-amplification does not combine with dp-adaptive-clipping (the "
                              "count of unclipped clients would be divided by the secret sample's size); set one false")
        if self.dp_sampling_amplification and self.fraction_train >= 1:
            raise ConfigError("run-config dp-sampling-amplification needs fraction-train < 1 (the sampling probability)")

    def check_baseline_keys(self) -> None:
        """Baselines are non-private references: privacy mechanisms would only blur them."""
        if self.baseline != "none" and (self.secure_aggregation or self.dp != "none"):
            raise ConfigError(f"run-config baseline = {self.baseline!r} is a non-private reference; "
                              "set secure-aggregation = false and dp = 'none' for it")

    def check_client_model_keys(self) -> None:
        """Emulators carry LoRA-family adapters, merged per layer over the clients that have it."""
        if all(model.is_full for model in self.client_models()):
            if self.emulator_distill_steps or self.emulator_adapters != "kept":
                raise ConfigError("run-config emulator-distill-steps and emulator-adapters need emulator clients "
                                  "(client-model 'emulator:<keep>'); leave them at 0 and 'kept' with client-model 'full'")
        elif why := self.emulator_refusal():
            raise ConfigError(f"run-config client-model {self.client_model!r} (emulator clients) {why}")

    def emulator_refusal(self) -> str | None:
        """Why this run cannot have emulator clients, or None if it can."""
        problems = {
            f"peft-method {self.peft_method!r}": self.peft_method not in ("lora", "ffa-lora"),
            "secure-aggregation": self.secure_aggregation,
            f"dp {self.dp!r}": self.dp != "none",
            f"baseline {self.baseline!r}": self.baseline != "none",
        }
        if bad := [what for what, set_ in problems.items() if set_]:
            return (f"does not combine with {', '.join(bad)}: emulators take peft-method lora or ffa-lora, and their "
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

    def client_learning_rate(self) -> float:
        """`learning-rate`, else the method's default."""
        from fedllm.methods import METHODS

        return self.learning_rate or METHODS[self.peft_method].default_learning_rate

    def dp_bounds_updates(self) -> bool:
        """Whether DP or secure aggregation already bounds each update (clip norm C, SecAgg+'s
        clipping range), so `max-update-norm = 'auto'` has nothing to add (and must not: a bound
        from the round's median would make one client's clipping depend on the others')."""
        return self.dp != "none" or self.secure_aggregation

    def client_side_dp(self) -> bool:
        """Whether clients clip and add noise themselves (local DP, or DP under secure aggregation)."""
        return self.dp == "local" or (self.dp == "central" and self.secure_aggregation)

    def additive_uploads(self) -> bool:
        """Whether uploads must be in additive coordinates (see `PeftMethod.upload`)."""
        return self.upload_codec().sparse or self.secure_aggregation or self.client_side_dp()

    def upload_codec(self) -> UploadCodec:
        return UploadCodec(self.upload_dtype, self.upload_sparsity or 1.0)

    def rank_for_partition(self, partition_id: int) -> int:
        """This partition's LoRA rank: `client-ranks` cycled over partitions, else `lora-rank`."""
        ranks = [int(p) for p in self.client_ranks.split(",") if p.strip()]
        return ranks[partition_id % len(ranks)] if ranks else self.lora_rank

    def faults_for(self, partition_id: int) -> list[str]:
        """The `fault-injection` kinds this partition's ClientApp applies to its reply, in order."""
        return [kind for partition, kind in parse_faults(self.fault_injection) if partition == partition_id]

    def server_optimizer_settings(self) -> ServerOptimizer:
        return ServerOptimizer(
            self.server_optimizer, self.server_learning_rate, self.server_momentum,
            self.server_beta1, self.server_beta2, self.server_tau,
        )

    def target_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())

    def as_dict(self) -> dict[str, Any]:
        """The config under its run-config keys, as written to outputs: secrets left out."""
        return {f.metadata["key"]: _toml_value(getattr(self, f.name)) for f in fields(self)
                if f.metadata["key"] not in SECRET_KEYS}

    def digest(self) -> str:
        """A short hash of the settings that determine the run's results (secrets left out)."""
        settings = {k: v for k, v in self.as_dict().items() if k not in RESULT_NEUTRAL_KEYS}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _toml_value(value: Any) -> Any:
    """None (an unset optional key) is written as '' as in pyproject.toml."""
    return "" if value is None else value


def _coerce(key: str, raw: Any, kind: str | type, accepts: str) -> Any:
    """Convert a TOML/CLI value to the field's type without silent truncation ('' = unset)."""
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind.endswith(" | None"):
        if raw == "":
            return None
        kind = kind[: -len(" | None")]
    bad = ConfigError(f"run-config {key} = {raw!r} is not accepted; expected {accepts}")
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if number and not math.isfinite(raw):
        raise ConfigError(f"run-config {key} = {raw!r} is not accepted; expected a finite value: {accepts}")
    if kind == "int":
        if not number or (isinstance(raw, float) and not raw.is_integer()):
            raise bad
        if abs(int(raw)) > LARGEST_INT:
            raise ConfigError(f"run-config {key} = {raw!r} is out of range; expected {accepts}, below 2^31")
        return int(raw)
    if kind == "float":
        if not number:
            raise bad
        return float(raw)
    if kind == "float | str":  # a number, or the word 'auto'
        if raw == AUTO:
            return raw
        if not number:
            raise bad
        return float(raw)
    if kind == "str":
        if not isinstance(raw, str):
            raise bad
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise bad
        return raw
    raise bad


def describe() -> str:
    """A Markdown table of every key, its default and what it accepts."""
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    for f in fields(RunConfig):
        rows.append(f"| `{f.metadata['key']}` | `{_toml_value(f.default)!r}` | {f.metadata['accepts']} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())

