"""Secure aggregation and differential privacy: the protocol math in-process, and real runs.

The real runs use Flower's SecAgg+ through `flwr run` on the embedded micro model: a secure TIES
run matches the plain one within quantization error, the server's audit copy of every message it
received shows no individual update, a client that drops out mid-round does not stop the round,
and a DP run stops at its ε target with ε equal to dp-accounting's own figure.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from client.privacy import privatize
from fedllm.checkpoint import saved_rounds
from fedllm.config import ConfigError, RunConfig
from fedllm.core.aggregator import Aggregator
from fedllm.core.nodes import NodeInfo
from fedllm.launch import RunFailed
from fedllm.merge import get_operator
from fedllm.methods import build_method
from fedllm.privacy.central import ServerDp
from fedllm.privacy.secure import client_step
from fedllm.seeds import secret_int
from server.secure import QUANTIZATION_RANGE
from tests.conftest import simulate
from tests.tiny_models import tiny_llama

# --------------------------------------------------------------------------------------------
# The protocol's arithmetic, without quantization: secure sums reproduce the operators exactly
# --------------------------------------------------------------------------------------------


def client_updates(count: int = 5, size: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(count, size, generator=generator), torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0][:count])


@pytest.mark.parametrize("operator, params", [
    ("weighted_average", {}), ("task_arithmetic", {"scale": 0.7}), ("magnitude_prune", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
])
def test_secure_sums_reproduce_the_deterministic_operators_exactly(operator, params):
    """SecAgg+ gives the server Σ p_k x_k; the client steps then the sum are the operator."""
    updates, weights = client_updates()
    p = weights / weights.sum()
    merged = params.get("scale", 1.0) * sum(pk * client_step(operator, u, params, seed=0) for pk, u in zip(p, updates))
    assert torch.allclose(merged, get_operator(operator)(updates, weights, **params), atol=1e-6)


def test_secure_dare_is_dare_with_each_client_s_own_drop_mask():
    updates, weights = client_updates()
    seeds = [secret_int(None) % 2**31 for _ in updates]
    values = [client_step("dare_linear", u, {"density": 0.5}, seed) for u, seed in zip(updates, seeds)]
    for value, update in zip(values, updates):
        kept = value != 0
        assert 0.4 < float(kept.float().mean()) < 0.6 and torch.allclose(value[kept], 2 * update[kept])


@pytest.mark.parametrize("operator, reason", [
    ("median", "needs every client's individual update"), ("trimmed_mean", "needs every client's individual update"),
    ("ties", "names the agreeing clients"), ("dare_ties", "names the agreeing clients"), ("della", "names the agreeing"),
])
def test_operators_that_would_reveal_individual_values_are_refused(operator, reason):
    with pytest.raises(ConfigError, match=rf"aggregation '{operator}' cannot run under secure aggregation: .*{reason}.*"
                                          r"use one of weighted_average, task_arithmetic, magnitude_prune"):
        RunConfig.from_flower({"secure-aggregation": True, "aggregation": operator})


@pytest.mark.parametrize("overrides, message", [
    ({"upload-dtype": "float16"}, "upload-dtype cannot be set with secure-aggregation"),
    ({"client-ranks": "4,8"}, "client-ranks gives clients different ranks"),
    ({"max-update-norm": 1.0}, "max-update-norm needs the server to see each update's norm"),
    ({"dp": "central", "aggregation": "ties"}, "dp = 'central' needs aggregation weighted_average or task_arithmetic"),
    ({"dp": "central", "dp-sampling-amplification": True}, "dp-sampling-amplification needs dp = 'central' without"),
])
def test_settings_secure_aggregation_or_dp_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"secure-aggregation": "dp" not in overrides or "dp-sampling-amplification" in overrides,
                               **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"dp": "local", "dp-sampling-amplification": True, "fraction-train": 0.5}, "needs dp = 'central'"),
    ({"dp": "central", "dp-sampling-amplification": True}, "needs fraction-train < 1"),
    ({"dp": "central", "dp-sampling-amplification": True, "fraction-train": 0.5, "dp-adaptive-clipping": True},
     "does not combine with dp-adaptive-clipping"),
    ({"dp-sampling-amplification": True, "fraction-train": 0.5}, "applies to dp = 'central' only"),
])
def test_sampling_amplification_is_refused_where_its_assumption_fails(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(overrides)


# --------------------------------------------------------------------------------------------
# Differential privacy: clipping bounds each client, noise has the configured spread
# --------------------------------------------------------------------------------------------


SHAPES = {"w": torch.Size([10, 10])}


def test_central_dp_bounds_every_client_s_contribution_by_the_clip_norm():
    dp = ServerDp(RunConfig.from_flower({"dp": "central", "dp-clip-norm": 0.5, "dp-noise-multiplier": 0.0}))
    huge = {"w": torch.full((10, 10), 100.0)}
    zero = {"w": torch.zeros(10, 10)}
    mean = dp.central_mean([huge, zero, zero, zero], SHAPES, server_round=1, population=4)
    assert float(mean["w"].norm()) == pytest.approx(0.5 / 4, rel=1e-5)


def test_central_dp_noise_has_the_configured_standard_deviation_and_never_repeats():
    cfg = RunConfig.from_flower({"dp": "central", "dp-clip-norm": 2.0, "dp-noise-multiplier": 0.8, "secret-seed": 3})
    zero, shapes = {"w": torch.zeros(200_000)}, {"w": torch.Size([200_000])}
    first, third = (ServerDp(cfg).central_mean([zero] * 4, shapes, r, population=4)["w"] for r in (1, 3))
    assert float(first.std()) == pytest.approx(0.8 * 2.0 / 4, rel=0.01) and abs(float(first.mean())) < 3e-3
    # A server restarted for round 3 (a fresh ServerDp) draws round 3's noise, not round 1's again.
    assert not torch.equal(first, third)
    assert torch.equal(third, ServerDp(cfg).central_mean([zero] * 4, shapes, 3, population=4)["w"])


def test_poisson_sampled_central_dp_divides_by_the_expected_count_and_may_release_noise_alone():
    cfg = RunConfig.from_flower({"dp": "central", "dp-clip-norm": 1.0, "dp-noise-multiplier": 0.0,
                                 "fraction-train": 0.25, "dp-sampling-amplification": True, "secret-seed": 4})
    dp = ServerDp(cfg)
    one = {"w": torch.full((10, 10), 100.0)}
    assert float(dp.central_mean([one], SHAPES, 1, population=8)["w"].norm()) == pytest.approx(1.0 / 2, rel=1e-5)
    assert torch.equal(dp.central_mean([], SHAPES, 1, population=8)["w"], torch.zeros(10, 10))
    sizes = [len(dp.poisson_sample(list(range(100)), r)) for r in range(1, 41)]
    assert 20 < sum(sizes) / len(sizes) < 30 and len(set(sizes)) > 5  # Binomial(100, 0.25) per round


def test_a_round_whose_poisson_sample_is_empty_releases_noise_alone_and_goes_on():
    """Skipping it would tell a reader the sample was empty, which depends on who was in the data."""
    cfg = RunConfig.from_flower({"dp": "central", "dp-noise-multiplier": 1.0, "fraction-train": 0.5,
                                 "dp-sampling-amplification": True, "secret-seed": 5})
    aggregator = Aggregator(cfg, build_method(cfg, tiny_llama()))
    for node in range(4):
        aggregator.nodes.admit(node, NodeInfo(partition_id=node, rank=8, num_examples=10))
    aggregator.start()
    aggregator.begin(1, [])
    aggregator.complete(1, [])
    noise = torch.cat([t.flatten() for t in aggregator.global_delta.values()])
    assert float(noise.std()) == pytest.approx(1.0 * cfg.dp_clip_norm / (0.5 * 4), rel=0.05)


@pytest.mark.parametrize("settings, expected_std", [
    ({"dp": "local"}, 0.6 * 2 * 1.5), ({"dp": "central", "secure-aggregation": True}, 0.6 * 1.5 / math.sqrt(4)),
])
def test_client_noise_has_the_configured_standard_deviation(settings, expected_std):
    cfg = RunConfig.from_flower({**settings, "dp-clip-norm": 1.5, "dp-noise-multiplier": 0.6, "secret-seed": 1})
    noised, norm = privatize(cfg, {"w": torch.full((200_000,), 1.0)}, server_round=1, partition_id=0, min_survivors=4)
    clipped = 1.5 / math.sqrt(200_000)
    assert norm == pytest.approx(math.sqrt(200_000))
    assert float((noised["w"] - clipped).std()) == pytest.approx(expected_std, rel=0.01)


# --------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------

RUN = "model='builtin:micro' local-steps=4 train-per-task=12 test-per-task=4 seed=2"
TWO_ROUNDS = f"{RUN} num-server-rounds=2"
ONE_ROUND = f"{RUN} num-server-rounds=1"  # comparisons: a second round would amplify quantization through training
PRUNE = "aggregation='magnitude_prune' aggregation-density=0.5 peft-method='ffa-lora'"


@pytest.fixture(scope="module")
def secure_runs(flower_env, tmp_path_factory):
    """magnitude_prune with and without SecAgg+, partition 1 crashing mid-round (after the key
    exchange) in both; and a secure dare_linear run whose server view the attacks read."""
    plain, secure, dare = (tmp_path_factory.mktemp(name) for name in ("plain", "secure", "dare"))
    settings = f"{ONE_ROUND} {PRUNE} fault-injection='1:crash'"
    simulate(f"{settings} audit-dir='{plain / 'audit'}'", clients=3, output_dir=plain)
    simulate(f"{settings} secure-aggregation=true audit-dir='{secure / 'audit'}'", clients=3, output_dir=secure)
    simulate(f"{ONE_ROUND} aggregation='dare_linear' aggregation-density=0.5 peft-method='ffa-lora' "
             f"secure-aggregation=true secret-seed=20261203 audit-dir='{dare / 'audit'}'", clients=3, output_dir=dare)
    return plain, secure, dare


def test_a_client_dropping_out_mid_round_does_not_stop_it(secure_runs):
    for out in secure_runs[:2]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["clients"], r["timed_out"] + r["rejected"]) for r in rows[1:]] == [(2, 1)], rows[1:]


def test_secure_magnitude_prune_matches_plain_within_quantization_error(secure_runs):
    """Over the same two surviving clients: the dropped one left no trace in the secure sum."""
    plain, secure = (AutoModelForCausalLM.from_pretrained(out / "model").state_dict() for out in secure_runs[:2])
    differences = torch.cat([(plain[k] - secure[k]).abs().flatten() for k in plain if "proj" in k])
    assert differences.max() > 0, "quantization leaves a trace"
    assert float(differences.max()) < 1e-4 and float(differences.median()) < 1e-6


def received(audit_dir) -> list:
    messages = []
    for path in sorted(audit_dir.glob("*.pb")):
        proto = ProtoRecordDict()
        proto.ParseFromString(path.read_bytes())
        messages.append(recorddict_from_proto(proto))
    return messages


def test_no_message_the_server_receives_holds_an_individual_update(secure_runs):
    plain, secure, _ = secure_runs
    plain_arrays = [a for m in received(plain / "audit") for record in m.array_records.values() for a in record.values()]
    assert plain_arrays, "control: without secure aggregation the server does receive each update"
    masked, senders = [], 0
    for message in received(secure / "audit"):
        assert all(len(record) == 0 for record in message.array_records.values())
        configs = message.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            senders += 1
            masked += [bytes_to_ndarray(blob).ravel() for blob in configs[Key.MASKED_PARAMETERS]]
    assert senders == 2, "one masked upload from each surviving client"
    # What the server decoded: one sum for the round, nothing to run the subset-sum attack of the
    # refused two-phase TIES on (a second sum of weights per entry).
    assert sorted(p.name for p in (secure / "audit").glob("view-*")) == ["view-0001.safetensors"]
    for vector in masked:  # plaintext would sit in [0, Q]; masked values are uniform over [0, 2^32)
        assert float((vector.astype(np.float64) <= QUANTIZATION_RANGE).mean()) < 0.02


def test_the_server_cannot_regenerate_secure_dare_drop_masks(secure_runs):
    """The seed attack: with masks seeded from what the server knows (run seed, round, partition),
    an entry every client dropped is exactly 0 in the sum, and an entry one client kept is that
    client's value. With each client's secret randomness the server's guess of the masks is no
    better than chance: its predicted all-dropped entries are zero no more often than any entry
    (within five binomial standard deviations of its guess; predictable masks would give 1.0).
    The clients' randomness comes from a `secret-seed` the attacker does not know, so the run replays."""
    view = load_file(secure_runs[2] / "audit" / "view-0001.safetensors")
    zero = torch.cat([(total == 0).flatten() for total in view.values()])
    chance = float(zero.float().mean())
    assert 0.05 < chance < 0.25, "about (1 - density)^3 of the entries: those every client dropped"
    for module, total in view.items():
        for index in range(len(view)):  # the seed offset per module: the attacker tries every one
            kept = [client_step("dare_linear", torch.ones_like(total), {"density": 0.5},
                                zlib.crc32(f"2:1:{partition}".encode()) + index) != 0 for partition in range(3)]
            predicted_dropped = ~(kept[0] | kept[1] | kept[2])
            guessed = float((total[predicted_dropped] == 0).float().mean())
            spread = math.sqrt(chance * (1 - chance) / int(predicted_dropped.sum()))
            assert guessed < chance + 5 * spread, f"{module}: the server's guess of the masks is better than chance ({guessed:.2f})"


def test_too_many_dropouts_fail_the_round_cleanly_and_leave_a_resumable_state(flower_env, tmp_path, capfd):
    """Resuming from that state is the same code path as test_faults' resume after a failed round."""
    with pytest.raises(RunFailed):
        simulate(f"{TWO_ROUNDS} secure-aggregation=true fault-injection='1:crash,2:crash'", clients=3,
                 output_dir=tmp_path)
    assert "secure aggregation halted" in capfd.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] and saved_rounds(tmp_path) == [0]
    assert not (tmp_path / "summary.json").exists()


def test_distributed_dp_reports_epsilon_of_its_survivors_per_round_stops_at_its_target_and_withholds_losses(
        flower_env, tmp_path, capfd):
    """3 clients under SecAgg+, which completes with 2: each adds z·C/√2, so a round with all 3 is
    a release at z·√(3/2), accounted so; ε checked against dp-accounting's own figure."""
    simulate(f"{RUN} num-server-rounds=6 dp='central' dp-noise-multiplier=1.2 dp-target-epsilon=6.0 "
             "secure-aggregation=true", clients=3, output_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    z = 1.2 * math.sqrt(3 / 2)

    def direct(rounds: int) -> float:
        return RdpAccountant().compose(SelfComposedDpEvent(GaussianDpEvent(z), rounds)).get_epsilon(1e-5)

    assert [r["dp_noise_multiplier"] for r in rows[1:]] == pytest.approx([z] * (len(rows) - 1), rel=1e-12)
    assert [r["epsilon"] for r in rows] == pytest.approx([0.0] + [direct(t) for t in range(1, len(rows))], rel=1e-9)
    assert direct(len(rows) - 1) <= 6.0
    assert summary["rounds"] == len(rows) - 1 < 6 and "dp-target-epsilon 6" in summary["stop_reason"]
    assert summary["epsilon"] == rows[-1]["epsilon"] and (tmp_path / "model").exists()
    # Nothing ε does not cover leaves the clients: no loss, every example count 1; and the run says so.
    assert all(r["train_loss"] is None for r in rows) and {n["num_examples"] for n in summary["nodes"]} == {1}
    assert all(r["client_train_seconds"] == {} for r in rows[1:]), "training times depend on the data too"
    assert "clients are weighted equally" in capfd.readouterr().out
