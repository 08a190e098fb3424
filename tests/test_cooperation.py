"""Cooperation across models: client models of other families teach the server model through their
answers (top-k token distributions) on public prompts, aligned across tokenizers, checked like any
update, and distilled into the exact server model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from client.faults import apply_to_knowledge
from fedllm.config import ConfigError, RunConfig
from fedllm.cooperation.align import SoftTarget, VocabularyMap, align, pack, unpack
from fedllm.cooperation.distill import distill, divergence
from fedllm.cooperation.knowledge import KNOWLEDGE, Answer, answer, to_arrays
from fedllm.cooperation.public import public_pool, round_prompts
from fedllm.cooperation.teachers import choose_teacher
from fedllm.core.nodes import ReplyRejected
from fedllm.data import BUILTIN_SUITES
from fedllm.data.example import Example
from fedllm.data.format import Prompter
from fedllm.data.tasks import SUITE_TASKS, builtin_suite, generate
from fedllm.emulator import ClientModel
from fedllm.models import load_model, load_tokenizer
from server.validation import checked_knowledge
from simulations.knowledge_noise_attack import graded, trained_client
from tests.conftest import simulate
from tests.deploy_support import read_metrics

PROMPT = Example("reverse", "abc", "", "reverse")


@pytest.fixture(scope="module")
def char() -> Prompter:
    """The builtin models' character tokenizer, plain layout (stop: eos)."""
    return Prompter(load_tokenizer("builtin:tiny"), "auto")


@pytest.fixture(scope="module")
def bpe(smollm2_path) -> Prompter:
    """SmolLM2's byte-level BPE tokenizer, chat layout (stop: <|im_end|>)."""
    return Prompter(load_tokenizer("smollm2-135m-instruct"), "auto")


def hand_answer(prompter: Prompter, rows: list[list[tuple[str | int, float]]]) -> Answer:
    """An answer whose candidates are given as (token text or id, probability), the model's own first."""
    def token(t):  # noqa: ANN001, ANN202
        return t if isinstance(t, int) else prompter.tokenizer(t, add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([[token(t) for t, _ in row] for row in rows])
    logprobs = torch.tensor([[math.log(p) for _, p in row] for row in rows], dtype=torch.float32)
    return Answer(ids, logprobs)


def single(prompter: Prompter, text: str) -> int:
    (token,) = prompter.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


# --------------------------------------------------------------------------------------------
# Alignment across tokenizers
# --------------------------------------------------------------------------------------------

def test_a_student_token_spanning_several_teacher_characters_gets_their_product(char, bpe):
    # SmolLM2 writes "cba" as "c" + "ba"; the character model's answer is c, b, a, end
    teacher = hand_answer(char, [[("c", 0.9), ("x", 0.05)], [("b", 0.8), ("a", 0.1)],
                                 [("a", 0.5), ("z", 0.2)], [(char.stop_id, 0.7), ("a", 0.2)]])
    target = align(teacher, char, bpe, VocabularyMap(char.tokenizer, bpe.tokenizer), PROMPT)
    assert target.example.output == "cba"
    assert bpe.answer_ids(target.example) == [single(bpe, "c"), single(bpe, "ba"), bpe.stop_id]
    c, ba, stop = target.soft
    assert c.ids == (single(bpe, "c"), single(bpe, "x")) and c.probs == pytest.approx((0.9 / 0.95, 0.05 / 0.95))
    # "ba": P(b)·P(a | b) = 0.4 on the token itself; the first character's other candidate "a" keeps its 0.1
    assert ba.ids == (single(bpe, "ba"), single(bpe, "a")) and ba.probs == pytest.approx((0.8, 0.2))
    assert stop.ids == (bpe.stop_id, single(bpe, "a")) and stop.probs == pytest.approx((0.7 / 0.9, 0.2 / 0.9))


def test_a_teacher_token_that_crosses_a_student_boundary_gives_no_soft_target(char, bpe):
    # SmolLM2 answers "abcab" as "abc" + "ab": no character of it is a whole BPE token
    teacher = hand_answer(bpe, [[("abc", 0.6), ("ab", 0.3)], [("ab", 0.9), ("a", 0.05)], [(bpe.stop_id, 0.95), ("a", 0.01)]])
    target = align(teacher, bpe, char, VocabularyMap(bpe.tokenizer, char.tokenizer), PROMPT)
    assert target.example.output == "abcab" and len(target.soft) == 6
    assert target.soft[:5] == (None,) * 5, "the hard labels still teach the text"
    assert target.soft[5].ids[0] == char.stop_id and target.soft[5].probs[0] == pytest.approx(0.95 / 0.96)


def test_identical_tokenizers_carry_the_distributions_over_unchanged(char):
    teacher = hand_answer(char, [[("c", 0.6), ("b", 0.3)], [("b", 0.5), ("q", 0.25)], [(char.stop_id, 0.9), ("a", 0.1)]])
    target = align(teacher, char, char, VocabularyMap(char.tokenizer, char.tokenizer), PROMPT)
    assert target.example.output == "cb"
    for soft, position in zip(target.soft, range(3)):
        ids, probs = zip(*teacher.candidates(position))
        assert soft.ids == ids and soft.probs == pytest.approx(tuple(p / sum(probs) for p in probs))


def test_the_servers_answers_reach_a_client_as_they_were_aligned(char, bpe):
    teacher = hand_answer(bpe, [[("c", 0.9), ("x", 0.05)], [("ba", 0.8), ("b", 0.1)], [(bpe.stop_id, 0.99), ("a", 0.005)]])
    prompts = [PROMPT, Example("swap ends", "abc", "", "swap")]
    targets = [align(teacher, bpe, char, VocabularyMap(bpe.tokenizer, char.tokenizer), p) for p in prompts]
    texts, arrays = pack(targets)
    received = unpack(prompts, texts, arrays, char, len(char.tokenizer))
    assert [t.example for t in received] == [t.example for t in targets]
    for got, sent in zip((s for t in received for s in t.soft), (s for t in targets for s in t.soft)):
        assert got == sent or (got.ids == sent.ids and got.probs == pytest.approx(sent.probs))  # sent as float32
    with pytest.raises(ValueError, match="do not match the answers' tokens"):
        unpack(prompts, ["cbaa", texts[1]], arrays, char, len(char.tokenizer))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unpack(prompts, texts, {**arrays, "soft-ids": arrays["soft-ids"] + 1000}, char, len(char.tokenizer))


# --------------------------------------------------------------------------------------------
# Answers on public prompts: produced, and checked like updates
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_answers(char):
    """A builtin model's answers (builtin:micro, built in seconds: the quick loop stays quick)."""
    model, _ = load_model("builtin:micro")
    prompts = [Example(e.instruction, e.input, "", e.task) for e in generate(SUITE_TASKS, 2, seed=5)]
    return prompts, answer(model, char, prompts, top_k=4, max_new_tokens=16, max_length=128)


def test_answers_are_greedy_with_the_models_own_token_first(builtin_answers, char):
    prompts, answers = builtin_answers
    model, _ = load_model("builtin:micro")
    from fedllm.evaluation import generate_answers

    texts = generate_answers(model, char, prompts, 16, max_length=128)
    for text, found in zip(texts, answers):
        tokens = found.tokens()
        assert char.tokenizer.decode(tokens[:-1] if tokens[-1] == char.stop_id else tokens) == text
        assert (found.logprobs[:, :-1] >= found.logprobs[:, 1:]).all() and (found.logprobs <= 0).all()


def test_noised_answers_are_seeded_differ_from_the_plain_ones_and_pass_the_servers_checks(builtin_answers, char):
    prompts, plain = builtin_answers
    model, _ = load_model("builtin:micro")
    again = answer(model, char, prompts, top_k=4, max_new_tokens=16, max_length=128, noise=0.0, seed=3)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(plain, again)), "no noise: the plain answers, whatever the seed"
    noised = [answer(model, char, prompts, top_k=4, max_new_tokens=16, max_length=128, noise=2.0, seed=s) for s in (1, 1, 2)]
    assert [a.tokens() for a in noised[0]] == [a.tokens() for a in noised[1]] != [a.tokens() for a in noised[2]]
    assert [a.tokens() for a in noised[0]] != [a.tokens() for a in plain]
    checked_knowledge(7, knowledge_record(to_arrays(noised[0])), len(prompts), 4, len(char.tokenizer))


def knowledge_record(arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict({KNOWLEDGE: ArrayRecord({name: Array(array) for name, array in arrays.items()})})


def test_well_formed_answers_pass_the_servers_checks(builtin_answers, char):
    prompts, answers = builtin_answers
    checked = checked_knowledge(7, knowledge_record(to_arrays(answers)), len(prompts), 4, len(char.tokenizer))
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs) for a, b in zip(answers, checked))


@pytest.mark.parametrize("kind, message", [
    ("knowledge-nan", "not all finite"),
    ("knowledge-top-k", r"expected \(\d+, 4\)"),
    ("knowledge-vocab", r"token ids in \[0, 100\)"),
])
def test_bad_answers_are_rejected_like_bad_updates(builtin_answers, char, kind, message):
    prompts, answers = builtin_answers
    cfg = RunConfig.from_flower({"fault-injection": f"3:{kind}"})
    record = apply_to_knowledge(cfg, 3, knowledge_record(to_arrays(answers))[KNOWLEDGE])
    with pytest.raises(ReplyRejected, match=f"node 7: .*{message}"):
        checked_knowledge(7, RecordDict({KNOWLEDGE: record}), len(prompts), 4, len(char.tokenizer))


def test_answers_that_claim_too_much_are_refused_before_decoding(builtin_answers, char):
    prompts, answers = builtin_answers
    arrays = to_arrays(answers)
    with pytest.raises(ReplyRejected, match="one answer per public prompt"):
        checked_knowledge(7, knowledge_record(arrays), len(prompts) + 1, 4, len(char.tokenizer))
    unsorted = {**arrays, "logprobs": arrays["logprobs"][:, ::-1].copy()}
    with pytest.raises(ReplyRejected, match="best first"):
        checked_knowledge(7, knowledge_record(unsorted), len(prompts), 4, len(char.tokenizer))
    huge = Array(dtype="float32", shape=(10**9, 4), stype="numpy.ndarray", data=b"\0" * 64)
    record = RecordDict({KNOWLEDGE: ArrayRecord({"lengths": Array(arrays["lengths"]), "ids": Array(arrays["ids"]),
                                                 "logprobs": huge})})
    with pytest.raises(ReplyRejected, match="not decoded"):
        checked_knowledge(7, record, len(prompts), 4, len(char.tokenizer))
    with pytest.raises(ReplyRejected, match="no 'knowledge' record"):
        checked_knowledge(7, RecordDict({}), len(prompts), 4, len(char.tokenizer))


# --------------------------------------------------------------------------------------------
# Distillation, public prompts, settings
# --------------------------------------------------------------------------------------------

def test_distilling_lowers_the_kl_to_a_teacher_of_another_tokenizer_on_a_fixed_batch(builtin_answers, char, bpe, smollm2_path):
    prompts, answers = builtin_answers
    vocabulary = VocabularyMap(char.tokenizer, bpe.tokenizer)
    targets = [align(a, char, bpe, vocabulary, p) for a, p in zip(answers, prompts)][:4]
    assert any(isinstance(s, SoftTarget) for t in targets for s in t.soft)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = divergence(student, bpe, targets)
    losses = distill(student, bpe, targets, steps=4, batch_size=len(targets), learning_rate=3e-3, alpha=0.5, seed=0)
    after = divergence(student, bpe, targets)
    assert after < 0.7 * before and losses[-1] < losses[0]


def test_the_answer_most_clients_agree_on_is_learned_from_its_most_confident_client():
    confidences = {1: -0.1, 2: -0.9, 3: -0.5, 4: -0.3}
    assert choose_teacher({1: "cba", 2: "abc", 3: "abc", 4: "cab"}, confidences) == (3, 0.5)  # not the lone, confident 1
    assert choose_teacher({1: "cba", 2: "abc", 3: "bca", 4: "cab"}, confidences) == (1, 0.25)  # no agreement: most confident
    assert choose_teacher({2: "x", 3: "x"}, {2: -0.2, 3: -0.2}) == (2, 1.0)


def test_public_prompts_never_include_a_test_prompt_and_vary_by_round():
    _, test = builtin_suite(10, 5, seed=0)
    pool = public_pool("", "builtin", seed=0, exclude=test[:3])
    assert all(p.output == "" for p in pool) and not {(e.instruction, e.input) for e in test[:3]} & {(p.instruction, p.input) for p in pool}
    assert round_prompts(pool, 8, 0, 1) == round_prompts(pool, 8, 0, 1) != round_prompts(pool, 8, 0, 2)


def test_every_builtin_suite_gives_public_prompts_of_each_of_its_tasks():
    for suite, tasks in BUILTIN_SUITES.items():  # structured tasks have fewer distinct inputs than the letter ones
        for seed in range(3):
            pool = public_pool("", suite, seed=seed)
            assert {p.task for p in pool} == {t.name for t in tasks} and len(pool) >= 100 * len(tasks)


def test_a_public_file_needs_no_outputs(tmp_path):
    path = tmp_path / "public.jsonl"
    path.write_text('{"instruction": "reverse", "input": "abc"}\n{"instruction": "twice", "input": "ab", "output": "abab"}\n')
    assert [(p.input, p.output) for p in public_pool(str(path), "mine.jsonl", seed=0)] == [("abc", ""), ("ab", "")]
    with pytest.raises(ValueError, match="set public-dataset"):
        public_pool("", "mine.jsonl", seed=0)


def test_another_model_as_client_model_needs_cooperation_and_cooperation_needs_one():
    assert ClientModel.parse("builtin:tiny").other == "builtin:tiny" and not ClientModel.parse("builtin:tiny").is_full
    with pytest.raises(ConfigError, match="set cooperation = 'distill'"):
        RunConfig.from_flower({"client-model": "full,builtin:tiny"})
    with pytest.raises(ConfigError, match="needs clients of another model"):
        RunConfig.from_flower({"cooperation": "distill"})
    for extra, named in (({"peft-method": "prompt-tuning"}, "peft-method"), ({"secure-aggregation": True}, "secure"),
                         ({"evaluation": "clients"}, "evaluation 'clients'")):
        with pytest.raises(ConfigError, match=named):
            RunConfig.from_flower({"client-model": "builtin:tiny", "cooperation": "distill", **extra})
    cfg = RunConfig.from_flower({"client-model": "full,builtin:micro", "cooperation": "distill"})
    assert [cfg.client_model_for_partition(p) for p in range(3)] == ["full", "builtin:micro", "full"]


@pytest.mark.slow  # it needs the pre-trained builtin:tiny, which a fresh cache builds in about 3 minutes
def test_answers_on_public_prompts_show_a_grading_server_which_tasks_a_client_holds_until_noise_ruins_them():
    """What cooperation reveals (docs/privacy.md, the attack of simulations/knowledge_noise_attack.py):
    a server that grades the public prompts names the three tasks a client trained on from one
    round's answers; `knowledge-noise` light enough to keep answers right does not hide them, and
    noise that does hide them leaves no right answer."""
    names = [task.name for task in SUITE_TASKS]
    train, _ = builtin_suite(200, 1, seed=0)
    for held in (names[:3], names[3:]):
        client, prompter = trained_client(held, train)
        assert graded(client, prompter, held, noise=0.0, seed=0)[0] == 3
        assert graded(client, prompter, held, noise=1.0, seed=0)[0] == 3
        named, right = graded(client, prompter, held, noise=6.0, seed=0)
        assert named < 3 and right == 0, (named, right)


# --------------------------------------------------------------------------------------------
# A simulation with clients of two models, one of them sending bad answers
# --------------------------------------------------------------------------------------------

HETEROGENEOUS = ("model='builtin:micro' client-model='full,builtin:micro-4l' cooperation='distill' num-server-rounds=2 "
                 "local-steps=5 batch-size=8 distill-steps=8 client-distill-steps=2 public-prompts=12 distill-top-k=4 "
                 "knowledge-noise=0.5 distill-learning-rate=0.01 train-per-task=40 test-per-task=4 "
                 "fault-injection='3:knowledge-nan'")


@pytest.fixture(scope="module")
def heterogeneous_run(flower_env, tmp_path_factory):
    return simulate(HETEROGENEOUS, 4, tmp_path_factory.mktemp("cooperation") / "run")


def test_clients_of_another_model_teach_the_server_and_bad_answers_are_left_out(heterogeneous_run):
    rows = read_metrics(heterogeneous_run)[1:]
    assert len(rows) == 2
    for row in rows:
        assert row["clients"] == 3 and row["rejected"] == 1 and "not all finite" in row["rejected_reasons"][0]
        assert row["teacher_choices"] == {"1": 12}, "partition 3's answers were rejected; partitions 0 and 2 train the server's model"
        assert row["teacher_kl_after"] < row["teacher_kl_before"]
        assert set(row["family_accuracy"]) == {"builtin:micro-4l"}
        assert row["client_upload_bytes"]["1"] > 0 and "3" in row["client_upload_bytes"]


def test_the_distilled_server_model_is_exported_exactly_and_its_adapter_loads(heterogeneous_run):
    out = heterogeneous_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base, _ = load_model("builtin:micro")
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the merged updates and the distillation changed the server model"
    assert isinstance(PeftModel.from_pretrained(base, str(out / "adapter")), PeftModel)
