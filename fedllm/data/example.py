"""The one record type every data source produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """An instruction example in the Alpaca layout, tagged with the task it belongs to.

    `task` drives partitioning and per-task metrics; data without task labels use "default".
    """

    instruction: str
    input: str
    output: str
    task: str = "default"
