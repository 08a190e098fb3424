"""How an example is laid out for the model: fedllm's plain layout, or the tokenizer's chat template.

Training learns only the answer and the token that ends it; evaluation prompts the same way and
stops at that token, so a chat model is trained and scored the way its users talk to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm.data.example import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANSWER_MARK = ">"
PROMPT_FORMATS = ("auto", "plain", "chat")  # auto: chat when the tokenizer has a chat template


def prompt_text(example: Example) -> str:
    """The plain layout: what the model reads; it must continue with the answer and stop."""
    return f"{example.instruction}\n{example.input}\n{ANSWER_MARK}"


def user_turn(example: Example) -> list[dict[str, str]]:
    """The chat layout: the instruction and its input as one user message."""
    return [{"role": "user", "content": "\n".join(part for part in (example.instruction, example.input) if part)}]


def uses_chat(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> bool:
    """Whether `prompt-format` lays examples out in the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ValueError("prompt-format = 'chat', but the model's tokenizer has no chat template; "
                         "use 'plain' (or 'auto', which picks plain for such a model)")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt-format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)


class Prompter:
    """Token ids of an example's prompt and of its answer in one layout; every answer ends with
    `stop_id` (eos in the plain layout, the template's end-of-turn token in the chat one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str = "plain") -> None:
        self.tokenizer = tokenizer
        self.chat = uses_chat(tokenizer, prompt_format)
        self.stop_id = self._end_of_turn() if self.chat else tokenizer.eos_token_id

    def prompt_ids(self, example: Example) -> list[int]:
        return self._ids(self._chat_prompt(user_turn(example)) if self.chat else prompt_text(example))

    def answer_ids(self, example: Example) -> list[int]:
        return self._ids(example.output) + [self.stop_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _end_of_turn(self) -> int:
        """The first token the template writes after an assistant's answer (e.g. `<|im_end|>`)."""
        probe, turn = "ANSWER", user_turn(Example("question", "", ""))
        prompt = self._chat_prompt(turn)
        whole = self.tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": probe}], tokenize=False)
        if not whole.startswith(prompt + probe):
            raise ValueError("the tokenizer's chat template does not write the assistant's answer right after its "
                             "generation prompt, so fedllm cannot tell which tokens are the answer; use prompt-format = 'plain'")
        tail = self._ids(whole[len(prompt + probe):].strip())
        return tail[0] if tail else self.tokenizer.eos_token_id
