"""The data's run-config keys: which dataset, how it is split into train and test, and how the
training split is partitioned over clients."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.data.partition import parse_partition
from fedllm.data.format import PROMPT_FORMATS
from fedllm.settings import ConfigError, Settings, choice, positive, setting


def _is_partition(value: str) -> bool:
    try:
        parse_partition(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class DataSettings(Settings):
    """The instruction data and its split over clients."""

    dataset: str = setting(
        "dataset", "builtin", lambda v: bool(v.strip()),
        "'builtin', 'builtin:structured', a local .json/.jsonl/.csv file, or 'hf:<name>'",
        "instruction data ('builtin:structured': record tasks for real pretrained models)",
    )
    partition: str = setting(
        "partition", "dirichlet:0.5", _is_partition, "'iid', 'dirichlet:<alpha>' or 'pathological:<k>'",
        "how training data is split across clients",
    )
    train_per_task: int = setting("train-per-task", 400, positive, "an integer >= 1", "built-in suites: training examples per task")
    test_per_task: int = setting("test-per-task", 40, positive, "an integer >= 1", "built-in suites: test examples per task")
    test_fraction: float = setting(
        "test-fraction", 0.1, lambda v: 0 < v < 1, "a number in (0, 1)", "file datasets: share held out for evaluation"
    )
    validation_fraction: float = setting(
        "validation-fraction", 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)",
        "share of the training split held out from every client for tuning (never the test split); the server "
        "scores it as validation_accuracy",
    )
    prompt_format: str = choice(
        "prompt-format", "auto", PROMPT_FORMATS,
        "how examples are laid out: fedllm's plain 'instruction, input, >' or the tokenizer's chat template "
        "(auto: chat when the model has one); only the answer is learned",
    )

    def check(self) -> None:
        """The validation split is scored by the server."""
        if self.validation_fraction > 0 and self.evaluation == "clients":
            raise ConfigError("validation-fraction needs the server to score the validation split: use evaluation = "
                              "'server' or 'both'")
