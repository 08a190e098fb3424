"""Bad client replies and faults: validation before aggregation, injected faults in real runs.

The ClientApp corrupts its reply on purpose when `fault-injection` names its partition
(client/faults.py); the server must reject each bad reply with a reason naming the node and the
problem, go on with the good ones, fail cleanly (and resumably) when too few are left, and keep
running when a SuperNode dies and comes back (tests/test_node_loss.py).
"""

from __future__ import annotations

import json
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.faults import InjectedFault, apply, apply_to_query, inject
from fedllm.adapters import factor_key
from fedllm.config import FAULT_KINDS, ConfigError, RunConfig
from fedllm.launch import RunFailed
from fedllm.lowrank import dense
from fedllm.methods.lora import Layer, Lora
from fedllm.core.aggregator import Aggregator
from fedllm.core.nodes import NodeInfo, NodeRefused, ReplyRejected
from server.nodes import admit, node_bounds
from server.plain import Transport
from tests.conftest import simulate
from tests.deploy_support import read_metrics

# --------------------------------------------------------------------------------------------
# The run-config keys
# --------------------------------------------------------------------------------------------


def test_fault_injection_is_parsed_per_partition():
    cfg = RunConfig.from_flower({"fault-injection": " 1:nan, 2:shape,1:dtype "})
    assert cfg.faults_for(1) == ["nan", "dtype"] and cfg.faults_for(2) == ["shape"] and cfg.faults_for(0) == []


@pytest.mark.parametrize("value, message", [
    ("1:bogus", r"entry '1:bogus': unknown kind 'bogus'; accepted kinds: nan, shape, missing"),
    ("nan", r"entry 'nan' is not '<partition-id>:<kind>'"),
    ("x:nan", r"entry 'x:nan' is not '<partition-id>:<kind>'"),
    ("-1:nan", r"entry '-1:nan' is not '<partition-id>:<kind>'"),
])
def test_a_bad_fault_injection_names_the_entry_and_the_kinds(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        RunConfig.from_flower({"fault-injection": value})
    assert "examples-absurd" in str(error.value) and "hang" in str(error.value)


def test_max_update_norm_is_auto_by_default_off_with_an_empty_value_or_a_positive_bound():
    assert RunConfig.from_flower({}).max_update_norm == "auto"
    assert RunConfig.from_flower({"max-update-norm": ""}).max_update_norm is None
    assert RunConfig.from_flower({"max-update-norm": 5}).max_update_norm == 5.0
    for bad in (-1, "always"):
        with pytest.raises(ConfigError, match=r"max-update-norm = .* expected 'auto', '' \(off\) or a number > 0"):
            RunConfig.from_flower({"max-update-norm": bad})


def test_fault_injection_does_not_change_the_digest_but_max_update_norm_does():
    base = RunConfig.from_flower({})
    assert base.digest() == RunConfig.from_flower({"fault-injection": "0:nan"}).digest()
    assert base.digest() != RunConfig.from_flower({"max-update-norm": 10.0}).digest()


# --------------------------------------------------------------------------------------------
# What each fault does to a reply, and how the server's checks answer it (no Flower run needed:
# records can be built anywhere; a reply is duck-typed, since a Message needs a running run)
# --------------------------------------------------------------------------------------------

MODULE, RANK, ALPHA, NODE = "layer", 2, 4.0, 17


def good_records() -> tuple[ArrayRecord, MetricRecord]:
    generator = torch.Generator().manual_seed(0)
    arrays = ArrayRecord({
        factor_key(MODULE, "A"): torch.randn(RANK, 6, generator=generator),
        factor_key(MODULE, "B"): torch.randn(4, RANK, generator=generator) * 0.01,
    })
    metrics = MetricRecord({"num-examples": 40, "train_loss": 0.5, "partition-id": 0, "lora-rank": RANK,
                            "pid": 1, "model-builds": 1})
    return arrays, metrics


def transport(nodes: dict[int, NodeInfo] | None = None, **overrides) -> Transport:
    """The plain round's reply handling over an aggregator that sent `nodes` (default: NODE) their
    rank-RANK state in round 1."""
    cfg = RunConfig.from_flower({"lora-alpha": ALPHA, "max-update-norm": 100.0, **overrides})
    aggregator = Aggregator(cfg, Lora(cfg, {MODULE: Layer(torch.Size([4, 6]), transposed=False)}))
    for node, info in (nodes or {NODE: NodeInfo(partition_id=0, rank=RANK, num_examples=40)}).items():
        aggregator.nodes.admit(node, info)
    aggregator.start()
    aggregator.begin(1, sorted(aggregator.nodes.online))
    return Transport(aggregator)


def client_update(transport: Transport, reply) -> tuple[torch.Tensor, float]:
    contribution, _ = transport.contribution(reply)
    return contribution.update, contribution.weight


def reply(content: RecordDict | None = None, error: str | None = None, node: int = NODE) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), content=content,
                           error=SimpleNamespace(reason=error), has_error=lambda: error is not None)


def faulty(kind: str) -> RecordDict:
    arrays, metrics = inject(kind, *good_records())
    return RecordDict({"arrays": arrays, "metrics": metrics})


def test_a_good_reply_gives_its_model_space_update():
    arrays, metrics = good_records()
    s = transport()
    tau, examples = client_update(s, reply(RecordDict({"arrays": arrays, "metrics": metrics})))
    sent = s.aggregator.sent[RANK]
    change = arrays.to_torch_state_dict()
    a, b = (sent.state[factor_key(MODULE, f)] + change[factor_key(MODULE, f)] for f in "AB")
    assert examples == 40.0 and torch.allclose(dense(tau[MODULE]), (ALPHA / RANK) * b @ a - dense(sent.reference[MODULE]))


@pytest.mark.parametrize("kind, reason", [
    ("nan", rf"node {NODE}: .*lora_A.weight contains 1 NaN and 0 Inf"),
    ("shape", r"has shape \(1, 6\), expected \(2, 6\)"),
    ("missing", r"1 missing tensor\(s\) \['base_model.model.layer.lora_B.weight'\] compared with the 2 expected"),
    ("extra", r"1 extra tensor\(s\) \['injected.extra.weight'\]"),
    ("dtype", r"has dtype float64; with upload-dtype float32 the server accepts float32 only"),
    ("norm", r"model-space update norm .* exceeds max-update-norm 100"),
    ("examples-zero", rf"node {NODE} reported 0 training examples; it must be > 0"),
    ("examples-absurd", r"absurd 1000000000000 training examples, more than the 40 it reported at start-up"),
    ("metrics-type", r"train_loss is str '0.5', expected a finite real number"),
])
def test_each_injected_fault_is_rejected_with_its_reason(kind, reason):
    with pytest.raises(ReplyRejected, match=reason):
        client_update(transport(), reply(faulty(kind)))


def test_crash_raises_and_hang_sleeps():
    with pytest.raises(InjectedFault, match="crash"):
        inject("crash", *good_records())
    started = time.monotonic()
    arrays, metrics = inject("hang", *good_records(), hang_seconds=0.2)
    assert time.monotonic() - started >= 0.2 and metrics["train_loss"] == 0.5


QUERY_INFO = {"partition-id": 0, "lora-rank": RANK, "num-examples": 40}


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("crash", "hang") and not k.startswith("knowledge-")])
def test_every_fault_kind_changes_the_reply_or_the_start_up_answer_it_is_for(kind):
    cfg = RunConfig.from_flower({"fault-injection": f"0:{kind}"})
    arrays, metrics = good_records()
    bad_arrays, bad_metrics = apply(cfg, 0, arrays, metrics)
    changed_reply = dict(bad_metrics) != dict(metrics) or bad_arrays.keys() != arrays.keys() or any(
        bad_arrays[k].numpy().shape != arrays[k].numpy().shape or bad_arrays[k].numpy().dtype != arrays[k].numpy().dtype
        or not (bad_arrays[k].numpy() == arrays[k].numpy()).all() for k in arrays)
    changed_answer = dict(apply_to_query(cfg, 0, MetricRecord(QUERY_INFO))) != QUERY_INFO
    assert changed_reply != changed_answer, "a kind acts on exactly one of the two messages"
    assert apply(RunConfig(), 0, arrays, metrics) == (arrays, metrics)


def edited(metrics: dict | None = None, arrays: dict | None = None, drop: str | None = None) -> RecordDict:
    good_arrays, good_metrics = good_records()
    records = {"arrays": ArrayRecord({**good_arrays.to_torch_state_dict(), **(arrays or {})}),
               "metrics": ConfigRecord({**dict(good_metrics), **(metrics or {})})}
    records.pop(drop, None)
    return RecordDict(records)


@pytest.mark.parametrize("content, reason", [
    (edited(drop="arrays"), r"reply has no 'arrays' record \(it has \['metrics'\]\)"),
    (edited(drop="metrics"), r"reply has no 'metrics' record"),
    (RecordDict({"arrays": good_records()[0], "metrics": good_records()[0]}), r"'metrics' record is an ArrayRecord, expected a MetricRecord"),
    (edited({"train_loss": math.inf}), r"train_loss is float inf, expected a finite real number"),
    (edited({"train_loss": [0.1, 0.2]}), r"train_loss is list"),
    (edited({"lora-rank": 2.0}), r"lora-rank is float 2.0, expected a positive int"),
    (edited({"lora-rank": 0}), r"lora-rank is int 0, expected a positive int"),
    (edited({"lora-rank": 4}), r"replied with rank 4, but was sent rank\(s\) \[2\]"),
    (edited({"num-examples": 12.5}), r"num-examples is float 12.5, expected a positive integer"),
    (edited({"num-examples": -3}), r"reported -3 training examples; it must be > 0"),
    (edited(arrays={factor_key(MODULE, "B"): torch.full((4, RANK), math.inf)}), r"contains 0 NaN and 8 Inf"),
    (edited(arrays={factor_key(MODULE, "B"): torch.full((4, RANK), 1e30),
                    factor_key(MODULE, "A"): torch.full((RANK, 6), 1e30)}), r"norm is not finite"),
])
def test_other_bad_replies_are_rejected_with_their_reason(content, reason):
    with pytest.raises(ReplyRejected, match=reason):
        client_update(transport(), reply(content))


def test_error_replies_and_unknown_nodes():
    with pytest.raises(ReplyRejected, match=rf"node {NODE} failed: boom"):
        client_update(transport(), reply(error="boom"))
    # a node missing from the start-up table has nothing its claims could be checked against
    with pytest.raises(ReplyRejected, match=r"node 99 never answered the start-up query"):
        client_update(transport(), reply(edited({"num-examples": 10}), node=99))
    # without max-update-norm the norm is not bounded (only required to be finite)
    assert client_update(transport(**{"max-update-norm": ""}), reply(faulty("norm")))[1] == 40.0


# --------------------------------------------------------------------------------------------
# The start-up answer: every field checked against bounds the run derives, a bad node left out
# --------------------------------------------------------------------------------------------


def answer(drop: str | None = None, **fields) -> RecordDict:
    info = {k: v for k, v in {**QUERY_INFO, **{k.replace("_", "-"): v for k, v in fields.items()}}.items() if k != drop}
    return RecordDict({"node": MetricRecord(info), "node-model": ConfigRecord({"client-model": "full"})})


@pytest.mark.parametrize("content, reason", [
    (RecordDict({}), r"node 5: its start-up answer has no 'node' record \(it has none\)"),
    (answer(drop="num-examples"), r"node 5: its start-up answer has no num-examples"),
    (answer(partition_id=-1), r"partition-id is int -1, expected an integer in \[0, 2147483647\]"),
    (RecordDict({"node": ConfigRecord({**QUERY_INFO, "partition-id": "two"})}), r"partition-id is str 'two'"),
    (answer(lora_rank=0), r"lora-rank is int 0, expected an integer in \[1, 4\]"),
    (answer(lora_rank=-3), r"lora-rank is int -3"),
    (answer(lora_rank=10**7), r"lora-rank is int 10000000, expected an integer in \[1, 4\]"),  # the layer is 4 x 6
    (answer(num_examples=-7), r"num-examples is int -7, expected an integer in \[1, 10000000\]"),
    (answer(num_examples=10**9), r"num-examples is int 1000000000"),
    (answer(num_examples=2.5), r"num-examples is float 2.5"),
    (RecordDict({"node": MetricRecord(QUERY_INFO), "node-model": ConfigRecord({"client-model": "x" * 500})}),
     r"client-model is str 'xxx"),
])
def test_a_bad_start_up_answer_leaves_the_node_out_with_the_reason(content, reason):
    aggregator = transport().aggregator
    with pytest.raises(NodeRefused, match=reason):
        admit(aggregator, None, None, 5, content)
    assert 5 not in aggregator.nodes.nodes and 5 not in aggregator.nodes.online


def test_a_partition_held_by_an_online_node_is_refused_and_free_again_once_it_is_offline():
    aggregator = transport().aggregator
    registry = aggregator.nodes
    registry.connected(set())
    assert admit(aggregator, None, None, 5, answer(partition_id=3)).partition_id == 3 and registry.online == {5}
    with pytest.raises(NodeRefused, match=r"node 6: partition-id 3 is already held by online node 5"):
        admit(aggregator, None, None, 6, answer(partition_id=3))
    assert registry.connected({6, 7}) == [6, 7]  # node 5 went away: a restarted node may take its partition
    assert admit(aggregator, None, None, 7, answer(partition_id=3)).partition_id == 3


def test_an_array_declaring_more_than_was_sent_is_refused_before_it_is_decoded():
    arrays, metrics = good_records()
    huge = np.zeros((2048, 2048), dtype=np.float32)  # 16 MiB under an expected name (a 4 x 2 factor)
    records = RecordDict({"arrays": ArrayRecord({**{k: arrays[k] for k in arrays},
                                                 factor_key(MODULE, "B"): Array(huge)}), "metrics": metrics})
    with pytest.raises(ReplyRejected, match=r"lora_B.weight declares shape \(2048, 2048\) and \d+ bytes, more than "
                                            r"the 8 entries it can hold; not decoded"):
        client_update(transport(), reply(records))


def test_a_non_finite_or_absurd_global_update_fails_the_round_before_it_is_saved():
    aggregator = transport().aggregator
    aggregator.commit(3, {MODULE: torch.full((4, 6), 0.5)}, {})
    for bad in (math.nan, math.inf, 2e4):
        with pytest.raises(RuntimeError, match=r"round 3: the merged global update of layer has an entry of .* "
                                               r"nothing is checkpointed"):
            aggregator.commit(3, {MODULE: torch.full((4, 6), bad)}, {"u": {}})
        assert aggregator.global_delta[MODULE].eq(0.5).all() and aggregator.optimizer_state == {}


def test_the_rank_bound_is_the_smaller_of_max_client_rank_and_the_layers():
    assert node_bounds(transport().aggregator).max_rank == 4  # min(d_in, d_out) of the 4 x 6 layer
    assert node_bounds(transport(**{"max-client-rank": 3}).aggregator).max_rank == 3
    assert node_bounds(transport(**{"max-client-examples": 50}).aggregator).max_examples == 50


# --------------------------------------------------------------------------------------------
# Simulation: every bad-reply kind on its own partition, in a real `flwr run`
# --------------------------------------------------------------------------------------------

BAD = ("nan", "shape", "missing", "extra", "dtype", "norm", "examples-zero", "examples-absurd", "metrics-type", "crash")
GOOD = 2
REASONS = {  # fault kind -> what its rejection reason says
    "nan": r"contains \d+ NaN", "shape": r"has shape", "missing": r"\d+ missing tensor", "extra": r"\d+ extra tensor",
    "dtype": r"has dtype float64", "norm": r"update norm .* exceeds max-update-norm",
    "examples-zero": r"reported 0 training examples", "examples-absurd": r"absurd \d+ training examples",
    "metrics-type": r"train_loss is str", "crash": r"failed: .*injected fault 'crash'",
}
SMALL = ("model='builtin:micro' local-steps=2 batch-size=8 train-per-task=24 test-per-task=4 partition='iid' "
         "min-clients=2 fraction-train=1.0 seed=3")


def test_every_bad_reply_is_rejected_and_the_rounds_go_on(flower_env, tmp_path):
    faults = ",".join(f"{partition}:{kind}" for partition, kind in enumerate(BAD))
    out = simulate(f"{SMALL} num-server-rounds=2 max-update-norm=100 fault-injection='{faults}'",
                   clients=len(BAD) + GOOD, output_dir=tmp_path)
    assert (out / "summary.json").exists()
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == GOOD and row["rejected"] == len(BAD), row
        reasons = row["rejected_reasons"]
        assert len(reasons) == len(BAD)
        for kind, pattern in REASONS.items():
            matching = [r for r in reasons if re.search(pattern, r)]
            assert len(matching) == 1, (kind, reasons)
        assert all(r.startswith("node ") for r in reasons)
        assert math.isfinite(row["train_loss"]) and row["train_loss"] < 100


def test_too_few_good_replies_fail_the_round_and_the_run_resumes_without_the_faults(flower_env, tmp_path, capfd):
    settings = f"{SMALL} num-server-rounds=2"
    with pytest.raises(RunFailed):
        simulate(f"{settings} fault-injection='0:nan,1:crash'", clients=3, output_dir=tmp_path)
    log = capfd.readouterr().out
    assert "round 1: only 1 valid replies (min-clients = 2)" in log, log[-3000:]
    assert "contains 1 NaN" in log and "failed" in log
    failed_rows = read_metrics(tmp_path)
    assert [r["round"] for r in failed_rows] == [0]  # round 0 was checkpointed, round 1 was not completed

    simulate(f"{settings} resume=true", clients=3, output_dir=tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0] == failed_rows[0]  # restored from the checkpoint, not recomputed
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in rows[1:]), rows
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["fault-injection"] == ""


def test_aggregation_does_not_depend_on_the_order_replies_arrive():
    """Replies arrive in timing-dependent order; the merged update must be bitwise the same."""
    import itertools

    replies = []
    for node in (20, 21, 22, 23):
        generator = torch.Generator().manual_seed(node)
        arrays = ArrayRecord({
            factor_key(MODULE, "A"): torch.randn(RANK, 6, generator=generator),
            factor_key(MODULE, "B"): torch.randn(4, RANK, generator=generator) * 0.37,
        })
        metrics = MetricRecord({"num-examples": 10 + node, "train_loss": 0.5, "lora-rank": RANK})
        replies.append(reply(RecordDict({"arrays": arrays, "metrics": metrics}), node=node))
    results = []
    for order in itertools.permutations(replies):
        merging = transport({node: NodeInfo(partition_id=node - 20, rank=RANK, num_examples=40) for node in (20, 21, 22, 23)})
        contributions, _, rejected = merging.accepted(1, list(order))
        merging.aggregator.complete(1, contributions)
        assert not rejected
        results.append(merging.aggregator.global_delta[MODULE])
    assert all(torch.equal(results[0], other) for other in results[1:])
