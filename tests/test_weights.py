"""Weight packets: flattening into buckets and back, and what a sync carries between two policies."""

from __future__ import annotations

import torch

from common import adapters
from common.config import load_config
from common.policy import Policy
from learner.weights import pack, unpack


def test_pack_splits_into_bounded_buckets_and_unpacks_exactly():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(100, generator=g).bfloat16(),
               "c": torch.arange(5), "d": torch.zeros(0), "e": torch.rand(2, 2, generator=g) > 0.5}
    packet = pack(tensors, version=7, what="adapters", bucket_bytes=256)
    assert len(packet.buckets) > 1 and all(b.numel() <= 256 for b in packet.buckets)
    assert packet.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    handle = packet.handle()
    assert handle.buckets is None and handle.version == 7
    out = unpack(handle, packet.buckets)
    assert out.keys() == tensors.keys()
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype and torch.equal(out[k], tensors[k])


def _policies():
    cfg = load_config("configs/toy.yaml", ["model.diffusers_transformer=null"])
    learner, worker = Policy.from_config(cfg), Policy.from_config(cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"seed": 1})}))
    for p in learner.model.parameters():  # make every tensor differ between the two sides
        p.data.add_(0.01)
    return learner, worker


def test_adapter_sync_carries_both_adapters_and_nothing_else():
    learner, worker = _policies()
    params = adapters.train_adapter(learner.model, adapters.SEMI)
    for p in params:
        p.data.normal_()
    packet = pack(learner.synced_tensors("adapters"), 1, "adapters", 1 << 20)
    assert all(k.split("/")[0] in adapters.ADAPTERS for k, *_ in packet.table)
    worker.load_synced_tensors(unpack(packet), "adapters")
    for name in adapters.ADAPTERS:
        got, want = adapters.adapter_state_dict(worker.model, name), adapters.adapter_state_dict(learner.model, name)
        assert all(torch.equal(got[k], want[k]) for k in want)
    base = "blocks.0.attn1.to_q.base_layer.weight"
    assert not torch.equal(worker.model.state_dict()[base], learner.model.state_dict()[base])


def test_full_sync_makes_the_worker_identical():
    learner, worker = _policies()
    worker.load_synced_tensors(unpack(pack(learner.synced_tensors("full"), 1, "full", 1 << 16)), "full")
    a, b = learner.model.state_dict(), worker.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert learner.base_fingerprint() == worker.base_fingerprint()
