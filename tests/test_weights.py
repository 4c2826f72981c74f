"""Weight packets: flattening into buckets and back, and what a sync carries between two policies."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.dataflow.weights import pack, unpack
from common.model import adapters
from common.model.policy import Policy
from tests.conftest import DTYPES


def test_pack_splits_into_bounded_buckets_and_unpacks_exactly():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(100, generator=g).bfloat16(),
        "c": torch.arange(5),
        "d": torch.zeros(0),
        "e": torch.rand(2, 2, generator=g) > 0.5,
    }
    packet = pack(tensors, version=7, what="adapters", bucket_bytes=256)
    assert len(packet.buckets) > 1 and all(b.numel() <= 256 for b in packet.buckets)
    assert packet.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    handle = packet.handle()
    assert handle.buckets is None and handle.version == 7
    out = unpack(handle, packet.buckets)
    assert out.keys() == tensors.keys()
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype and torch.equal(out[k], tensors[k])


def _policies(dtype=torch.float32):
    cfg = load_config(
        "configs/toy.yaml", ["model.diffusers_transformer=null", f"model.dtype={str(dtype).removeprefix('torch.')}"]
    )
    learner, worker = (
        Policy.from_config(cfg),
        Policy.from_config(cfg.model_copy(update={"model": cfg.model.model_copy(update={"seed": 1})})),
    )
    for p in learner.model.parameters():  # make every tensor differ between the two sides
        p.data.add_(0.01)
    return learner, worker


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_sync_carries_both_adapters_and_nothing_else(dtype):
    learner, worker = _policies(dtype)
    params = adapters.train_adapter(learner.model, adapters.SEMI)
    for p in params:
        p.data.normal_()
    packet = pack(learner.synced_tensors("adapters"), 1, "adapters", 1 << 20)
    assert all(k.split("/")[0] in adapters.ADAPTERS for k, *_ in packet.table)
    # The adapters are float32 master weights on a base of any dtype, and travel as such.
    assert {dt for _, dt, *_ in packet.table} == {"torch.float32"}
    worker.load_synced_tensors(unpack(packet), "adapters")
    for name in adapters.ADAPTERS:
        got, want = adapters.adapter_state_dict(worker.model, name), adapters.adapter_state_dict(learner.model, name)
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    base = "blocks.0.attn1.to_q.base_layer.weight"
    assert not torch.equal(worker.model.state_dict()[base], learner.model.state_dict()[base])


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_sync_makes_the_worker_identical(dtype):
    learner, worker = _policies(dtype)
    packet = pack(learner.synced_tensors("full"), 1, "full", 1 << 16)
    # bf16: the base in bf16, diffusers' fp32 modules and the adapters in float32, all as they are.
    assert {dt for _, dt, *_ in packet.table} == {str(dtype), "torch.float32"}
    worker.load_synced_tensors(unpack(packet), "full")
    a, b = learner.model.state_dict(), worker.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert learner.base_fingerprint() == worker.base_fingerprint()
