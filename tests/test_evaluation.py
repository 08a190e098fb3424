"""Scoring: each metric on hand cases, pooling over evaluators, cached generation for prompt-learning
methods, chat-template masking on SmolLM2's real tokenizer, and hostile evaluation replies."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedllm.config import ConfigError, RunConfig
from fedllm.core.nodes import ReplyRejected
from fedllm.data.example import Example
from fedllm.data.format import Prompter, prompt_text
from fedllm.evaluation import (
    EXACT_MATCH, LOSS, PERPLEXITY, POOLED, ROUGE_L, Scores, answer_losses, greedy, rouge_l, score,
)
from fedllm.models import char_tokenizer
from fedllm.train import IGNORE, collate, encode
from server.validation import MAX_EVAL_TASKS, checked_scores

TOKENIZER = char_tokenizer()
PLAIN = Prompter(TOKENIZER)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=TOKENIZER.pad_token_id,
        bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id,
    )).eval()


# ---------------------------------------------------------------------------- metrics


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert rouge_l("mat the on", "the cat sat on the mat") == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert rouge_l("Olleh!", "olleh") == 1.0  # lower-cased words of letters and digits
    assert rouge_l("", "olleh") == 0.0 and rouge_l("dlrow", "olleh") == 0.0


def test_the_loss_of_one_example_is_the_models_own_mean_token_loss_over_its_answer():
    model, examples = tiny_llama(), [Example("reverse", "abc", "cba", "t"), Example("copy", "hello", "hello", "t")]
    losses = answer_losses(model, PLAIN, examples, 128)
    for example, loss in zip(examples, losses):
        batch = collate(encode(PLAIN, [example], 128), TOKENIZER.pad_token_id, torch.device("cpu"))
        with torch.no_grad():
            assert loss == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    assert losses[0] != pytest.approx(losses[1])


def test_scores_are_per_task_means_and_perplexity_is_the_exponential_of_the_loss():
    model = tiny_llama()
    examples = [Example("copy", "ab", "ab", "copy"), Example("copy", "cd", "cd", "copy"), Example("rev", "ab", "ba", "rev")]
    scores = score(model, PLAIN, examples)
    assert scores.counts == {"copy": 2, "rev": 1}
    losses = answer_losses(model, PLAIN, examples, 128)
    assert scores.values[LOSS] == pytest.approx({"copy": (losses[0] + losses[1]) / 2, "rev": losses[2]})
    assert scores.metrics()[PERPLEXITY]["rev"] == pytest.approx(math.exp(losses[2]))
    assert set(scores.values) == set(POOLED) and all(0 <= v <= 1 for v in scores.values[ROUGE_L].values())


def test_pooled_scores_weight_each_task_by_the_examples_each_evaluator_scored():
    a = Scores({"x": 1, "y": 3}, {EXACT_MATCH: {"x": 1.0, "y": 0.0}, ROUGE_L: {"x": 1.0, "y": 0.5}, LOSS: {"x": 1.0, "y": 2.0}})
    b = Scores({"y": 1}, {EXACT_MATCH: {"y": 1.0}, ROUGE_L: {"y": 1.0}, LOSS: {"y": 4.0}})
    pooled = Scores.pooled([a, b])
    assert pooled.counts == {"x": 1, "y": 4}
    assert pooled.values[EXACT_MATCH] == {"x": 1.0, "y": 0.25}
    assert pooled.values[LOSS]["y"] == pytest.approx((3 * 2.0 + 4.0) / 4)
    assert pooled.headline(EXACT_MATCH) == pytest.approx((1.0 + 0.25) / 2), "tasks weigh equally in the headline"


# ---------------------------------------------------------------------------- cached generation


def recomputed(model: torch.nn.Module, ids: torch.Tensor, steps: int, stop_id: int) -> list[list[int]]:
    """Greedy decoding the slow way: the whole sequence through the model at every step."""
    width = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1:].argmax(-1)], 1)
    return [row[: row.index(stop_id)] if stop_id in row else row for row in ids[:, width:].tolist()]


@pytest.mark.parametrize("peft_config", [
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
], ids=["prompt-tuning", "prefix-tuning", "lora"])
def test_cached_greedy_decoding_gives_the_answers_of_recomputing_every_step(peft_config):
    model = get_peft_model(tiny_llama(), peft_config)
    with torch.no_grad():  # trained-looking virtual tokens, so they change the answers
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(4, len(TOKENIZER), (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = greedy(model, ids, 12, stop_id=TOKENIZER.eos_token_id)
    assert cached == recomputed(model, ids, 12, TOKENIZER.eos_token_id)
    assert max(len(row) for row in cached) > 3
    with model.disable_adapter(), torch.no_grad():
        assert greedy(model, ids, 12, stop_id=TOKENIZER.eos_token_id) != cached, "the adapter changes the answers"


# ---------------------------------------------------------------------------- prompt formats


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_a_chat_model_learns_only_its_answer_and_the_end_of_its_turn(smollm2_tokenizer):
    example = Example("Reverse the word.", "hello", "olleh")
    prompter = Prompter(smollm2_tokenizer, "auto")
    assert prompter.chat and smollm2_tokenizer.decode([prompter.stop_id]) == "<|im_end|>"
    (ids, labels), = encode(prompter, [example], 512)
    learned = [token for token, label in zip(ids, labels) if label != IGNORE]
    assert smollm2_tokenizer.decode(learned) == "olleh<|im_end|>"
    assert labels[: len(ids) - len(learned)] == [IGNORE] * (len(ids) - len(learned)), "the answer comes last"
    prompt = smollm2_tokenizer.decode(ids[: len(ids) - len(learned)])
    assert prompt.endswith("<|im_start|>user\nReverse the word.\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert ids[: len(ids) - len(learned)] == smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse the word.\nhello"}], add_generation_prompt=True, tokenize=True)["input_ids"]


def test_plain_format_ignores_a_template_and_a_model_without_one_cannot_ask_for_chat(smollm2_tokenizer):
    example = Example("Reverse the word.", "hello", "olleh")
    plain = Prompter(smollm2_tokenizer, "plain")
    assert not plain.chat and smollm2_tokenizer.decode(plain.prompt_ids(example)) == prompt_text(example)
    assert not Prompter(TOKENIZER, "auto").chat
    with pytest.raises(ValueError, match="prompt-format = 'chat', but the model's tokenizer has no chat template"):
        Prompter(TOKENIZER, "chat")


# ---------------------------------------------------------------------------- settings


def test_evaluate_every_scores_round_zero_every_nth_round_and_the_last():
    cfg = RunConfig.from_flower({"evaluate-every": 3})
    assert [r for r in range(8) if cfg.evaluates(r, 7)] == [0, 3, 6, 7]


@pytest.mark.parametrize("overrides, message", [
    ({"dp": "central"}, "releases each client's test scores, which the DP accountant does not cover"),
    ({"baseline": "local-only"}, "keeps one model per client on the server"),
    ({"metric": "bleu"}, "exact-match or rouge-l"),
])
def test_client_evaluation_refuses_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"evaluation": "clients", **overrides})


# ---------------------------------------------------------------------------- hostile replies


def reply(names, **lists) -> RecordDict:
    values = {"examples": [3] * len(names), **{m: [0.5] * len(names) for m in POOLED}, **lists}
    return RecordDict({"tasks": ConfigRecord({"names": names}), "scores": MetricRecord(values)})


def test_a_valid_evaluation_reply_becomes_scores():
    scores = checked_scores(7, reply(["a", "b"], examples=[2, 5], loss=[0.25, 3.0]), max_examples=10)
    assert scores.counts == {"a": 2, "b": 5} and scores.values[LOSS] == {"a": 0.25, "b": 3.0}


@pytest.mark.parametrize("content, problem", [
    (RecordDict({"scores": MetricRecord({"examples": [1]})}), "an evaluation reply needs a 'tasks' ConfigRecord"),
    (reply([f"t{i}" for i in range(MAX_EVAL_TASKS + 1)]), "task names are"),
    (reply(["a", "a"]), "task names are"),
    (reply(["x" * 201]), "task names are"),
    (reply(["a"], examples=[0]), r"evaluation examples is .*expected 1 number\(s\) in \[1, 10\]"),
    (reply(["a"], examples=[11]), r"evaluation examples is"),
    (reply(["a", "b"], **{"exact-match": [0.5]}), "evaluation exact-match is"),
    (reply(["a"], **{"rouge-l": [1.5]}), "evaluation rouge-l is"),
    (reply(["a"], loss=[float("nan")]), "evaluation loss is"),
    (reply(["a"], loss=[-1.0]), "evaluation loss is"),
], ids=["no-tasks", "too-many", "repeated", "long-name", "zero-examples", "too-many-examples", "short-list",
        "rouge-above-1", "nan-loss", "negative-loss"])
def test_a_bad_evaluation_reply_is_rejected_naming_the_node_and_the_field(content, problem):
    with pytest.raises(ReplyRejected, match=f"node 7: {problem}"):
        checked_scores(7, content, max_examples=10)
