"""The run configuration: every subsystem's settings composed into one validated object.

Flower hands the ServerApp and ClientApp `[tool.flwr.app.config]` merged with `--run-config`
overrides as a flat dict with hyphenated keys. `RunConfig.from_flower` turns it into a typed,
validated object: each key belongs to one subsystem's settings dataclass (`fedllm.settings`), which
checks its value and the combinations it cannot take; an unknown key or a bad value raises
`ConfigError` naming the key and what it accepts. `python -m fedllm.config` prints the table the
README shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedllm.cooperation.settings import CooperationSettings
from fedllm.core.server_methods.settings import ServerMethodSettings
from fedllm.data.settings import DataSettings
from fedllm.emulator import EmulatorSettings
from fedllm.evaluation import EvaluationSettings
from fedllm.merge.settings import MergeSettings
from fedllm.methods.settings import MethodSettings
from fedllm.privacy.settings import PrivacySettings
from fedllm.robust import RobustSettings
from fedllm.server_optim import OptimizerSettings
from fedllm.settings import ConfigError, Settings, anything, coerce, positive, setting, toml_value
from fedllm.train import TrainingSettings
from fedllm.wire import WireSettings

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

# What `fault-injection` can make a partition's ClientApp do to its reply (see client/faults.py).
FAULT_KINDS = (
    "nan", "shape", "missing", "extra", "dtype", "norm", "examples-zero", "examples-absurd", "metrics-type",
    "crash", "hang", "query-rank", "query-missing", "query-examples", "knowledge-nan", "knowledge-top-k", "knowledge-vocab",
)


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


@dataclass(frozen=True)
class FederationSettings(Settings):
    """The rounds, who takes part in them, and the base model."""

    num_server_rounds: int = setting("num-server-rounds", 30, positive, "an integer >= 1", "federated rounds")
    fraction_train: float = setting(
        "fraction-train", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]", "fraction of nodes sampled per round"
    )
    min_clients: int = setting("min-clients", 2, positive, "an integer >= 1", "fewest nodes a round may train on")
    model: str = setting(
        "model", "builtin:tiny", lambda v: bool(v.strip()),
        "'builtin:tiny' (or tiny-8l, micro, micro-4l), a Hugging Face name, a local path, a .gguf file or "
        "'smollm2-135m-instruct'",
        "base model (a GGUF model is converted once into the fedllm cache)",
    )
    seed: int = setting("seed", 0, lambda v: v >= 0, "an integer in [0, 2^31)", "seed of data, sampling and training")
    round_timeout: float = setting("round-timeout", 3600.0, positive, "seconds > 0", "longest wait for a round's replies")


@dataclass(frozen=True)
class OutputSettings(Settings):
    """Where a run writes, how it resumes, and the testing aids."""

    output_dir: str = setting("output-dir", "", anything, "a folder path, or '' for outputs/<timestamp>", "where results go")
    overwrite: bool = setting(
        "overwrite", False, anything, "true or false",
        "replace an earlier run in output-dir (without it, and without resume, such a folder is refused untouched)",
    )
    audit_dir: str = setting(
        "audit-dir", "", anything, "'' or a folder",
        "write every message the server receives there (what the server could read)",
    )
    fault_injection: str = setting(
        "fault-injection", "", _is_fault_list,
        f"'' or comma-separated <partition-id>:<kind>, kind one of {', '.join(FAULT_KINDS)}",
        "testing aid: the ClientApp of that partition corrupts its reply that way (e.g. '1:nan,2:shape')",
    )
    resume: bool = setting(
        "resume", False, anything, "true or false",
        "continue the run in output-dir from its last completed round",
    )
    resume_from: str = setting(
        "resume-from", "", anything, "'' or the folder of an earlier run",
        "continue that run from its last completed round (outputs go to output-dir, default the same folder)",
    )
    resume_round: int | None = setting(
        "resume-round", None, lambda v: v >= 0, "'' (the newest checkpoint) or a round >= 0 still kept",
        "resume: continue after this round instead, rolling back the rounds after it",
    )
    keep_checkpoints: int = setting(
        "keep-checkpoints", 3, positive, "an integer >= 1", "checkpoints kept (the newest rounds'), for resume-round",
    )

    def check(self) -> None:
        if self.resume and not (self.output_dir or self.resume_from):
            raise ConfigError("resume = true needs output-dir set to the folder of the run to continue (or use resume-from)")
        if self.resume_round is not None and not (self.resume or self.resume_from):
            raise ConfigError("run-config resume-round needs resume = true (or resume-from)")
        if self.overwrite and (self.resume or self.resume_from):
            raise ConfigError("run-config overwrite = true replaces the earlier run; it does not combine with resume")

    def resumes(self, folder: Path) -> bool:
        """Whether this run continues the run in `folder` (`resume`, or `resume-from` naming it)."""
        return self.resume or (bool(self.resume_from) and Path(self.resume_from).expanduser().resolve() == folder)

    def faults_for(self, partition_id: int) -> list[str]:
        """The `fault-injection` kinds this partition's ClientApp applies to its reply, in order."""
        return [kind for partition, kind in parse_faults(self.fault_injection) if partition == partition_id]


# The subsystems, in the order of the key table; each one's checks run in this order too, so with
# two problems the first named is the merge's, then the method's, privacy's, the baseline's, ...
SUBSYSTEMS: tuple[type[Settings], ...] = (
    FederationSettings, TrainingSettings, MergeSettings, OptimizerSettings, MethodSettings, WireSettings,
    PrivacySettings, ServerMethodSettings, EmulatorSettings, CooperationSettings, DataSettings, EvaluationSettings, RobustSettings,
    OutputSettings,
)


@dataclass(frozen=True)
class RunConfig(*reversed(SUBSYSTEMS)):  # dataclass fields follow the reversed MRO: the table order above
    """Validated settings of one federated run (field names are the keys with '_' for '-')."""

    @classmethod
    def check_keys(cls, run_config: Mapping[str, Any]) -> None:
        """Raise `ConfigError` naming the first unknown key (values are checked by `from_flower`)."""
        known = {f.metadata["key"] for f in fields(cls)}
        for key in run_config:
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {', '.join(sorted(known))}")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse a Flower run config; unknown keys, bad values and refused combinations raise `ConfigError`."""
        cls.check_keys(run_config)
        by_key = {f.metadata["key"]: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            spec = by_key[key]
            value = values[spec.name] = coerce(key, raw, spec.type, spec.metadata["accepts"])
            if value is not None and not spec.metadata["check"](value):
                raise ConfigError(f"run-config {key} = {raw!r} is not accepted; expected {spec.metadata['accepts']}")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Every subsystem's refusals, in `SUBSYSTEMS` order."""
        for subsystem in SUBSYSTEMS:
            subsystem.check(self)

    def additive_uploads(self) -> bool:
        """Whether uploads must be in additive coordinates (see `PeftMethod.upload`)."""
        return self.upload_codec().sparse or self.secure_aggregation or self.client_side_dp()

    def factored_server(self) -> bool:
        """Whether the server may keep LoRA updates and ΔW_g as factors (`fedllm.lowrank`): not where
        it adds dense noise (central DP), receives dense sums or coordinates (additive uploads), or a
        baseline keeps its own per-client updates."""
        return not self.additive_uploads() and self.dp == "none" and self.baseline == "none"

    def as_dict(self) -> dict[str, Any]:
        """The config under its run-config keys, as written to outputs: secrets left out."""
        return {f.metadata["key"]: toml_value(getattr(self, f.name)) for f in fields(self)
                if f.metadata["key"] not in SECRET_KEYS}

    def digest(self) -> str:
        """A short hash of the settings that determine the run's results (secrets left out)."""
        settings = {k: v for k, v in self.as_dict().items() if k not in RESULT_NEUTRAL_KEYS}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def describe() -> str:
    """A Markdown table of every key, its default and what it accepts."""
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    for f in fields(RunConfig):
        rows.append(f"| `{f.metadata['key']}` | `{toml_value(f.default)!r}` | {f.metadata['accepts']} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
