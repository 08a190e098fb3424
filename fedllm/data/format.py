"""The prompt layout shared by every task, built-in or loaded from a file."""

from __future__ import annotations

from fedllm.data.example import Example

ANSWER_MARK = ">"


def prompt_text(example: Example) -> str:
    """What the model reads; it must continue with the answer and stop."""
    return f"{example.instruction}\n{example.input}\n{ANSWER_MARK}"
