"""Secure aggregation and differential privacy: the protocol math in-process, and real runs.

The real runs use Flower's SecAgg+ through `flwr run` on the embedded micro model: a secure TIES
run matches the plain one within quantization error, the server's audit copy of every message it
received shows no individual update, a client that drops out mid-round does not stop the round,
and a DP run stops at its ε target with ε equal to dp-accounting's own figure.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from transformers import AutoModelForCausalLM

from client.privacy import privatize
from fedllm.checkpoint import saved_rounds
from fedllm.config import ConfigError, RunConfig
from fedllm.launch import RunFailed
from fedllm.merge import get_operator
from fedllm.privacy.secure import SIGN_CONSENSUS, agreement, client_step, disjoint_mean
from server.dp import ServerDp
from server.secure import QUANTIZATION_RANGE
from tests.conftest import simulate

# --------------------------------------------------------------------------------------------
# The protocol's arithmetic, without quantization: secure sums reproduce the operators exactly
# --------------------------------------------------------------------------------------------


def client_updates(count: int = 5, size: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(count, size, generator=generator), torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0][:count])


def secure_merge(operator: str, updates: torch.Tensor, weights: torch.Tensor, params: dict, seeds: list[int]):
    """What the server gets from the clients' steps and weighted sums only (SecAgg+ gives Σ p_k x_k)."""
    p = weights / weights.sum()
    values = [client_step(operator, u, params, s) for u, s in zip(updates, seeds)]
    total = sum(pk * v for pk, v in zip(p, values))
    scale = params.get("scale", 1.0)
    if operator not in SIGN_CONSENSUS:
        return scale * total, values
    sign = torch.sign(total)
    parts = [agreement(v, sign) for v in values]
    mean_agreeing = sum(pk * a for pk, (a, _) in zip(p, parts))
    mean_indicator = sum(pk * m for pk, (_, m) in zip(p, parts))
    return scale * disjoint_mean(mean_agreeing, mean_indicator, float(p.min())), values


@pytest.mark.parametrize("operator, params", [
    ("weighted_average", {}), ("task_arithmetic", {"scale": 0.7}), ("magnitude_prune", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}), ("ties", {"density": 0.3, "scale": 1.5}),
])
def test_secure_sums_reproduce_the_deterministic_operators_exactly(operator, params):
    updates, weights = client_updates()
    merged, _ = secure_merge(operator, updates, weights, params, seeds=list(range(5)))
    assert torch.allclose(merged, get_operator(operator)(updates, weights, **params), atol=1e-6)


@pytest.mark.parametrize("operator", ["dare_ties", "della"])
def test_two_phase_consensus_over_client_drops_is_ties_on_the_dropped_values(operator):
    updates, weights = client_updates()
    merged, values = secure_merge(operator, updates, weights, {"density": 0.5, "scale": 1.2}, seeds=[7, 8, 9, 10, 11])
    assert all((v == 0).float().mean() > 0.2 for v in values), "each client dropped entries of its own"
    assert torch.allclose(merged, get_operator("ties")(torch.stack(values), weights, density=1.0, scale=1.2), atol=1e-6)


@pytest.mark.parametrize("operator", ["median", "trimmed_mean"])
def test_operators_that_need_individual_updates_are_refused(operator):
    with pytest.raises(ConfigError, match=rf"aggregation '{operator}' needs every client's individual update.*"
                                          r"use one of weighted_average, task_arithmetic, .*ties, dare_ties, della"):
        RunConfig.from_flower({"secure-aggregation": True, "aggregation": operator})


@pytest.mark.parametrize("overrides, message", [
    ({"upload-dtype": "float16"}, "upload-dtype cannot be set with secure-aggregation"),
    ({"client-ranks": "4,8"}, "client-ranks gives clients different ranks"),
    ({"max-update-norm": 1.0}, "max-update-norm needs the server to see each update's norm"),
    ({"dp": "central", "aggregation": "ties"}, "dp = 'central' needs aggregation weighted_average or task_arithmetic"),
])
def test_settings_secure_aggregation_or_dp_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"secure-aggregation": "dp" not in overrides, **overrides})


# --------------------------------------------------------------------------------------------
# Differential privacy: clipping bounds each client, noise has the configured spread
# --------------------------------------------------------------------------------------------


def test_central_dp_bounds_every_client_s_contribution_by_the_clip_norm():
    dp = ServerDp(RunConfig.from_flower({"dp": "central", "dp-clip-norm": 0.5, "dp-noise-multiplier": 0.0}))
    huge = {"w": torch.full((10, 10), 100.0)}
    zero = {"w": torch.zeros(10, 10)}
    mean = dp.central_mean([huge, zero, zero, zero])
    assert float(mean["w"].norm()) == pytest.approx(0.5 / 4, rel=1e-5)


def test_central_dp_noise_has_the_configured_standard_deviation():
    dp = ServerDp(RunConfig.from_flower({"dp": "central", "dp-clip-norm": 2.0, "dp-noise-multiplier": 0.8,
                                         "dp-noise-seed": 3}))
    zero = {"w": torch.zeros(200_000)}
    mean = dp.central_mean([zero] * 4)["w"]
    assert float(mean.std()) == pytest.approx(0.8 * 2.0 / 4, rel=0.01) and abs(float(mean.mean())) < 3e-3


@pytest.mark.parametrize("settings, expected_std", [
    ({"dp": "local"}, 0.6 * 1.5), ({"dp": "central", "secure-aggregation": True}, 0.6 * 1.5 / math.sqrt(4)),
])
def test_client_noise_has_the_configured_standard_deviation(settings, expected_std):
    cfg = RunConfig.from_flower({**settings, "dp-clip-norm": 1.5, "dp-noise-multiplier": 0.6, "dp-noise-seed": 1})
    noised, norm = privatize(cfg, {"w": torch.full((200_000,), 1.0)}, server_round=1, partition_id=0, num_clients=4)
    clipped = 1.5 / math.sqrt(200_000)
    assert norm == pytest.approx(math.sqrt(200_000))
    assert float((noised["w"] - clipped).std()) == pytest.approx(expected_std, rel=0.01)


# --------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------

RUN = "model='builtin:micro' local-steps=4 train-per-task=12 test-per-task=4 seed=2"
TWO_ROUNDS = f"{RUN} num-server-rounds=2"
ONE_ROUND = f"{RUN} num-server-rounds=1"  # comparisons: a second round would amplify quantization through training


@pytest.fixture(scope="module")
def ties_runs(flower_env, tmp_path_factory):
    """TIES with and without SecAgg+, partition 1 crashing mid-round (after the key exchange) in both."""
    plain, secure = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("secure")
    settings = f"{ONE_ROUND} aggregation='ties' peft-method='ffa-lora' fault-injection='1:crash'"
    simulate(f"{settings} audit-dir='{plain / 'audit'}'", clients=3, output_dir=plain)
    simulate(f"{settings} secure-aggregation=true audit-dir='{secure / 'audit'}'", clients=3, output_dir=secure)
    return plain, secure


def test_a_client_dropping_out_mid_round_does_not_stop_it(ties_runs):
    for out in ties_runs:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["clients"], r["timed_out"] + r["rejected"]) for r in rows[1:]] == [(2, 1)], rows[1:]


def test_secure_ties_matches_plain_ties_within_quantization_error(ties_runs):
    """Over the same two surviving clients: the dropped one left no trace in the secure sum."""
    plain, secure = (AutoModelForCausalLM.from_pretrained(out / "model").state_dict() for out in ties_runs)
    differences = torch.cat([(plain[k] - secure[k]).abs().flatten() for k in plain if "proj" in k])
    assert differences.max() > 0, "quantization leaves a trace"
    # Off by more than the quantization error only where the weighted vote is a tie at that precision.
    assert float((differences > 1e-4).float().mean()) < 5e-3
    assert float(differences.median()) < 1e-6


def received(audit_dir) -> list:
    messages = []
    for path in sorted(audit_dir.glob("*.pb")):
        proto = ProtoRecordDict()
        proto.ParseFromString(path.read_bytes())
        messages.append(recorddict_from_proto(proto))
    return messages


def test_no_message_the_server_receives_holds_an_individual_update(ties_runs):
    plain, secure = ties_runs
    plain_arrays = [a for m in received(plain / "audit") for record in m.array_records.values() for a in record.values()]
    assert plain_arrays, "control: without secure aggregation the server does receive each update"
    masked = []
    for message in received(secure / "audit"):
        assert all(len(record) == 0 for record in message.array_records.values())
        configs = message.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked += [bytes_to_ndarray(blob).ravel() for blob in configs[Key.MASKED_PARAMETERS]]
    assert len(masked) >= 2 * 2, "every surviving client's masked vector, in both exchanges of TIES"
    for vector in masked:  # plaintext would sit in [0, Q]; masked values are uniform over [0, 2^32)
        assert float((vector.astype(np.float64) <= QUANTIZATION_RANGE).mean()) < 0.02


def test_too_many_dropouts_fail_the_round_cleanly_and_leave_a_resumable_state(flower_env, tmp_path, capfd):
    """Resuming from that state is the same code path as test_faults' resume after a failed round."""
    with pytest.raises(RunFailed):
        simulate(f"{TWO_ROUNDS} secure-aggregation=true fault-injection='1:crash,2:crash'", clients=3,
                 output_dir=tmp_path)
    assert "secure aggregation halted" in capfd.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] and saved_rounds(tmp_path) == [0]
    assert not (tmp_path / "summary.json").exists()


def test_dp_reports_epsilon_per_round_and_stops_at_its_target(flower_env, tmp_path):
    """Central DP over SecAgg+'s weighted mean (the linear path; TIES above is the two-phase one)."""
    simulate(f"{RUN} num-server-rounds=4 dp='central' dp-noise-multiplier=1.2 dp-target-epsilon=6.0 "
             "secure-aggregation=true", clients=3, output_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())

    def direct(rounds: int) -> float:
        return RdpAccountant().compose(SelfComposedDpEvent(GaussianDpEvent(1.2), rounds)).get_epsilon(1e-5)

    assert [r["epsilon"] for r in rows] == pytest.approx([0.0] + [direct(t) for t in range(1, len(rows))], rel=1e-9)
    assert direct(len(rows) - 1) <= 6.0 < direct(len(rows))
    assert summary["rounds"] == len(rows) - 1 < 4 and "dp-target-epsilon 6" in summary["stop_reason"]
    assert summary["epsilon"] == rows[-1]["epsilon"] and (tmp_path / "model").exists()
