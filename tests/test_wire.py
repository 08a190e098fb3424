"""Upload encodings: exact reconstruction, error feedback, and what they save on the wire."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedllm.wire import UploadCodec, decode, encode


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(16, 12, generator=generator), "v": torch.randn(7, generator=generator)}


def shapes() -> dict[str, torch.Size]:
    return {name: t.shape for name, t in tensors().items()}


def wire_bytes(wire) -> int:
    record = ArrayRecord({name: Array(array) for name, array in wire.items()})
    return recorddict_to_proto(RecordDict({"arrays": record})).ByteSize()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_upload_reconstructs_exactly_what_was_sent(dtype):
    codec = UploadCodec(dtype=dtype)
    wire, residual = encode(tensors(), codec)
    got = decode(wire, shapes(), codec)
    for name, original in tensors().items():
        sent = original.to(getattr(torch, dtype)).float()
        assert torch.equal(got[name], sent)
        assert torch.equal(residual[name], original - sent)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sparse_upload_sends_the_largest_entries_exactly(dtype):
    codec = UploadCodec(dtype=dtype, density=0.25)
    wire, _ = encode(tensors(), codec)
    got = decode(wire, shapes(), codec)
    for name, original in tensors().items():
        keep = math.ceil(0.25 * original.numel())
        assert int((got[name] != 0).sum()) == keep
        threshold = original.abs().flatten().topk(keep).values.min()
        kept = got[name] != 0
        assert torch.equal(kept, original.abs() >= threshold)
        assert torch.equal(got[name][kept], original[kept].to(getattr(torch, dtype)).float())


def test_error_feedback_makes_the_sent_updates_sum_to_the_true_ones():
    codec = UploadCodec(dtype="float16", density=0.1)
    residual, sent_total, true_total = None, None, None
    for round_ in range(6):
        update = tensors(seed=round_)
        wire, residual = encode(update, codec, residual)
        sent = decode(wire, shapes(), codec)
        sent_total = sent if sent_total is None else {n: sent_total[n] + sent[n] for n in sent}
        true_total = update if true_total is None else {n: true_total[n] + update[n] for n in update}
    for name in true_total:
        assert torch.allclose(sent_total[name] + residual[name], true_total[name], atol=1e-5)


def test_half_precision_halves_the_serialized_size():
    generator = torch.Generator().manual_seed(1)
    update = {"q": torch.randn(256, 128, generator=generator), "v": torch.randn(128, 64, generator=generator)}
    full = wire_bytes(encode(update, UploadCodec("float32"))[0])
    half = wire_bytes(encode(update, UploadCodec("float16"))[0])
    brain = wire_bytes(encode(update, UploadCodec("bfloat16"))[0])
    assert half == pytest.approx(full / 2, rel=0.01) and brain == pytest.approx(half, rel=0.001)
    sparse = wire_bytes(encode(update, UploadCodec("float16", density=0.1))[0])
    assert sparse == pytest.approx(half * 0.1 * 3, rel=0.05), "10% of entries: 2-byte values + 4-byte indices"


def test_malformed_uploads_are_refused_naming_the_problem():
    codec = UploadCodec(density=0.5)
    wire, _ = encode(tensors(), codec)
    bad = dict(wire)
    bad["q::idx"] = bad["q::idx"].copy()
    bad["q::idx"][0] = 10_000
    with pytest.raises(ValueError, match="outside 0..191"):
        decode(bad, shapes(), codec)
    with pytest.raises(ValueError, match="missing the sparse arrays of v"):
        decode({k: a for k, a in wire.items() if not k.startswith("v")}, shapes(), codec)
    with pytest.raises(ValueError, match="unexpected arrays"):
        decode({**wire, "k::val": wire["v::val"]}, shapes(), codec)
    with pytest.raises(ValueError, match="choose one of float32, float16, bfloat16"):
        UploadCodec(dtype="int8")


def test_a_client_carries_what_a_sparse_upload_left_into_its_next_one():
    from flwr.app import Context

    from client.handlers import RESIDUAL, upload_record
    from fedllm.config import RunConfig

    cfg = RunConfig.from_flower({"upload-sparsity": 0.2, "upload-dtype": "float16"})
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    first, second = tensors(seed=1), tensors(seed=2)
    sent = [
        decode({k: a.numpy() for k, a in upload_record(cfg, update, context).items()}, shapes(), cfg.upload_codec())
        for update in (first, second)
    ]
    left = context.state[RESIDUAL].to_torch_state_dict()
    for name in first:
        assert torch.allclose(sent[0][name] + sent[1][name] + left[name], first[name] + second[name], atol=1e-5)
        assert left[name].abs().sum() > 0
