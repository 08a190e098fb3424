"""Encoding for training and greedy evaluation when prompts or answers outgrow the model's context."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedllm.data import builtin_suite
from fedllm.data.example import Example
from fedllm.data.format import Prompter, prompt_text
from fedllm.evaluation import EXACT_MATCH, context_length, generate_answers, score
from fedllm.models import char_tokenizer
from fedllm.train import IGNORE, encode

TOKENIZER = char_tokenizer()
PLAIN = Prompter(TOKENIZER)
EOS = TOKENIZER.eos_token_id


def ids_of(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def old_encode(example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """The rule before prompts were cut from the left: everything past `max_length` dropped."""
    prompt, answer = ids_of(prompt_text(example)), ids_of(example.output) + [EOS]
    return (prompt + answer)[:max_length], ([IGNORE] * len(prompt) + answer)[:max_length]


def tiny_llama(positions: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
        pad_token_id=TOKENIZER.pad_token_id, bos_token_id=TOKENIZER.bos_token_id, eos_token_id=EOS,
    )).eval()


def tiny_gpt2(positions: int = 32) -> GPT2LMHeadModel:
    """GPT-2 learns a table of `positions` position embeddings: a position past it is an IndexError."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(TOKENIZER), n_embd=16, n_layer=1, n_head=2, n_positions=positions,
        bos_token_id=TOKENIZER.bos_token_id, eos_token_id=EOS,
    )).eval()


LONG = Example("x" * 80 + "the end of the instruction", "12", "an answer", "long")  # prompt of 110 characters


# ---------------------------------------------------------------------------- encode


def test_a_prompt_longer_than_max_length_is_cut_from_the_left_and_the_whole_answer_kept():
    prompt, answer = ids_of(prompt_text(LONG)), ids_of(LONG.output) + [EOS]
    ids, labels = encode(PLAIN, [LONG], 32)[0]
    kept = 32 - len(answer)
    assert ids == prompt[-kept:] + answer
    assert labels == [IGNORE] * kept + answer
    assert TOKENIZER.decode(ids[:kept]).endswith("instruction\n12\n>")


def test_a_sequence_that_fits_is_encoded_exactly_as_before():
    train, test = builtin_suite(20, 5, seed=0)
    exact = Example("ab", "cd", "efgh")  # 7 prompt + 5 answer tokens: exactly 12
    for example in train + test:
        assert encode(PLAIN, [example], 128)[0] == old_encode(example, 128)
    assert len(encode(PLAIN, [exact], 12)[0][0]) == 12
    assert encode(PLAIN, [exact], 12)[0] == old_encode(exact, 12)


def test_a_prompt_that_fits_before_an_answer_that_does_not_loses_its_start_instead_of_the_answers_end():
    example = Example("abcdef", "", "0123456789")  # 9 prompt + 11 answer tokens
    ids, labels = encode(PLAIN, [example], 14)[0]
    assert ids == ids_of("\n\n>0123456789") + [EOS]
    assert labels == [IGNORE] * 3 + ids_of("0123456789") + [EOS]


def test_an_answer_longer_than_max_length_keeps_the_last_prompt_token_and_the_answers_start():
    example = Example("question", "", "z" * 50)
    ids, labels = encode(PLAIN, [example], 16)[0]
    assert ids == ids_of(">") + ids_of("z" * 15)
    assert labels == [IGNORE] + ids_of("z" * 15)


@pytest.mark.parametrize("max_length", [0, 1])
def test_max_length_without_room_for_a_prompt_and_an_answer_token_is_refused(max_length):
    with pytest.raises(ValueError, match=f"max_length must be at least 2 .* got {max_length}"):
        encode(PLAIN, [LONG], max_length)


# ---------------------------------------------------------------------------- generation and evaluation


def test_a_prompt_longer_than_the_context_runs_past_gpt2s_position_table_without_a_cut():
    with pytest.raises(IndexError):
        generate_answers(tiny_gpt2(32), PLAIN, [LONG], max_new_tokens=10)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_a_prompt_longer_than_the_context_is_cut_from_the_left_for_generation(build):
    model = build(32)
    answers = generate_answers(model, PLAIN, [LONG], max_new_tokens=10, max_length=32)
    assert len(answers) == 1 and isinstance(answers[0], str)
    # the cut keeps the prompt's last 22 tokens: the same as a prompt that is only those
    tail = Example(LONG.instruction[-(22 - len("\n12\n>")):], "12", LONG.output, LONG.task)
    assert len(ids_of(prompt_text(tail))) == 22
    assert answers == generate_answers(model, PLAIN, [tail], max_new_tokens=10)


def test_generation_that_leaves_no_room_for_a_prompt_is_refused():
    with pytest.raises(ValueError, match=r"max_new_tokens \(32\) leaves no room for a prompt in max_length \(32\)"):
        generate_answers(tiny_llama(32), PLAIN, [LONG], max_new_tokens=32, max_length=32)


def test_scoring_within_the_models_context_handles_prompts_and_answers_longer_than_it():
    model = tiny_gpt2(32)
    example = Example("y" * 100, "", "w" * 40, "long")
    with pytest.raises(IndexError):
        score(model, PLAIN, [example])
    assert score(model, PLAIN, [example], max_length=context_length(model)).values[EXACT_MATCH] == {"long": 0.0}


def test_scoring_no_examples_says_the_test_split_is_empty():
    with pytest.raises(ValueError, match="no test examples to evaluate"):
        score(tiny_llama(), PLAIN, [])


def test_context_length_is_the_models_positions_less_the_virtual_tokens_of_prompt_learning():
    assert context_length(tiny_llama(32)) == 32
    assert context_length(tiny_gpt2(48)) == 48
    prompted = get_peft_model(tiny_llama(32), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    assert context_length(prompted) == 24
