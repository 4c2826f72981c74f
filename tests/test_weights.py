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


# -- the collective transport when a member dies or hangs (gloo, ranks in threads and a process) ----


def _packet(megabytes: int, version: int):
    """A packet of `megabytes` one-megabyte buckets of distinct bytes: large enough that a send to a
    member that does not read fills the socket buffers and blocks."""
    g = torch.Generator().manual_seed(version)
    tensors = {f"t{i}": torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, generator=g) for i in range(megabytes)}
    return tensors, pack(tensors, version, "full", 1 << 20)


def _in_threads(calls: dict) -> dict:
    """Run each `calls[key]()` in its own thread; {key: (seconds, result or exception)} once all end."""
    import threading
    import time

    out: dict = {}

    def run(key, fn):
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            value = exc
        out[key] = (time.monotonic() - start, value)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _store():
    from common.dataflow.weights import CollectiveGroup, connect_store
    from common.net import free_port

    port = free_port()
    master = CollectiveGroup.host_store("127.0.0.1", port, timeout_s=60)
    return master, port, connect_store("127.0.0.1", port, 30)


def _form(port: int, generation: int, ranks: list[int], world: int) -> dict:
    from common.dataflow.weights import CollectiveGroup

    made = _in_threads(
        {r: (lambda r=r: CollectiveGroup("127.0.0.1", port, r, world, generation, "gloo", 60)) for r in ranks}
    )
    assert all(not isinstance(v, Exception) for _, v in made.values()), made
    return {r: v for r, (_, v) in made.items()}


def _deliver(groups: dict, tensors: dict, packet) -> None:
    """A broadcast over `groups` (rank 0 sends) that every member completes, bytes exact."""
    handle = packet.handle()
    done = _in_threads(
        {r: (lambda g=g, r=r: g.send(packet) if r == 0 else g.receive(handle)) for r, g in groups.items()}
    )
    for r, (_, value) in done.items():
        assert not isinstance(value, Exception), (r, value)
        if r:
            assert value.keys() == tensors.keys() and all(torch.equal(value[k], tensors[k]) for k in tensors)


def test_a_hung_member_is_aborted_and_the_next_generation_delivers_to_the_others():
    """Rank 1 formed the group and then never takes part (a hang): rank 0 and 2 would wait on it for
    the group's whole timeout (60 s here); the driver's abort ends their wait at once, and a group of
    the next generation without it, on the same store, delivers the packet exactly."""
    import time

    from common.dataflow.weights import WeightGroupError, abort_generation

    master, port, driver = _store()
    groups = _form(port, 0, [0, 1, 2], 3)
    tensors, packet = _packet(16, 1)
    _deliver(groups, tensors, packet)  # all three whole: one broadcast

    tensors, packet = _packet(16, 2)
    hung = {r: groups[r] for r in (0, 2)}

    def abort_soon():
        time.sleep(1.0)
        abort_generation(driver, 0)

    out = _in_threads(
        {
            0: lambda: hung[0].send(packet),
            2: lambda: hung[2].receive(packet.handle()),
            "driver": abort_soon,
        }
    )
    # Rank 0's 16 MB to a member that does not read cannot complete: it is ended by the abort.
    seconds, error = out[0]
    assert isinstance(error, WeightGroupError) and "aborted" in str(error), error
    assert seconds < 10
    assert out[2][0] < 10  # rank 2 either had its bytes already or gave up with the abort
    with pytest.raises(WeightGroupError):  # the generation is over for this member
        hung[0].send(packet)

    survivors = _form(port, 1, [0, 1], 2)  # rank 2 is rank 1 now
    _deliver(survivors, tensors, packet)
    del master


def test_a_member_killed_mid_broadcast_is_dropped_and_the_others_are_synced():
    """A real death: rank 1 is a process of its own, stopped while ranks 0 and 2 broadcast (so the
    broadcast is in flight and cannot have completed for it), then killed. Gloo fails rank 0's send
    (connection closed); the driver's abort ends whatever still waits; the next generation without
    the dead process delivers the packet to rank 2, exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from common.dataflow.weights import WeightGroupError, abort_generation

    master, port, driver = _store()
    member = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from common.dataflow.weights import CollectiveGroup\n"
            f"group = CollectiveGroup('127.0.0.1', {port}, 1, 3, 0, 'gloo', 60)\n"
            "print('joined', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        groups = _form(port, 0, [0, 2], 3)
        assert member.stdout.readline().strip() == "joined"
        tensors, packet = _packet(16, 3)
        os.kill(member.pid, signal.SIGSTOP)
        killed = {}

        def kill_mid_broadcast():
            time.sleep(1.0)  # ranks 0 and 2 are inside the broadcast by now
            os.kill(member.pid, signal.SIGKILL)
            member.wait()
            killed["at"] = time.monotonic()
            abort_generation(driver, 0)  # what the driver does once Ray reports the death

        out = _in_threads(
            {
                0: lambda: groups[0].send(packet),
                2: lambda: groups[2].receive(packet.handle()),
                "killer": kill_mid_broadcast,
            }
        )
        assert killed, "the member was never killed"
        seconds, error = out[0]
        assert isinstance(error, WeightGroupError), error  # rank 0 could not have sent it 16 MB
        assert 1.0 <= seconds < 10
        assert out[2][0] < 10

        survivors = _form(port, 1, [0, 1], 2)
        _deliver(survivors, tensors, packet)
    finally:
        if member.poll() is None:
            member.kill()
    del master
