"""Weight publishing: the learner's tensors, flattened into a few buckets, delivered in one call.

A sync ships a `WeightPacket`: the version, a table of (name, dtype, shape, bucket, offset) and the
buckets themselves, flat byte tensors of at most `cluster.bucket_mb` each. One packet per sync,
never one call per tensor (the per-tensor RPC overhead is what makes naive syncs slow).

Transports, behind one interface (`publish` on the learner, `receive` on a rollout worker):
- `object_store`: the learner `ray.put`s the buckets once; the driver hands every worker the same
  ObjectRef (the driver never fetches it); Ray moves the bytes worker-side, node to node. Works
  everywhere, CPU included.
- `collective`: a torch.distributed broadcast from learner rank 0 to every rollout worker over a
  process group of its own (NCCL on GPUs, gloo on CPU), formed per membership generation, so
  scaling the rollout workers forms a new group instead of tearing down the learners' group.

A collective with a dead member does not fail everywhere: gloo raises on the ranks that talk to it
(connection closed), the others wait for data that never comes until the group's timeout. So every
member waits on its rendezvous and its broadcast by polling, and gives up (`WeightGroupError`) as
soon as the driver, which sees the death through Ray, sets the generation's abort key in the store
(`abort_generation`); the driver then forms the next generation without the dead member. A group
given up with an operation still pending is kept (`_abandoned`) until gloo's timeout ends that
operation: destroying it earlier would block on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    )
}


@dataclass
class WeightPacket:
    version: int
    what: str  # "adapters" or "full"
    table: list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, bucket, byte offset
    bucket_sizes: list[int]
    buckets: list[torch.Tensor] | None = field(default=None, repr=False)  # uint8, absent in a handle
    base_fingerprint: str = ""  # the base weights the adapters belong to (common/model/policy.py)

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_sizes)

    def handle(self) -> WeightPacket:
        """The packet without its buckets: what travels through the driver."""
        return WeightPacket(self.version, self.what, self.table, self.bucket_sizes, None, self.base_fingerprint)


def pack(
    tensors: dict[str, torch.Tensor], version: int, what: str, bucket_bytes: int, base_fingerprint: str = ""
) -> WeightPacket:
    """Flatten `tensors` (sorted by name, so every side agrees) into byte buckets."""
    table, sizes, current, parts = [], [], 0, [[]]
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if current and current + n > bucket_bytes:
            sizes.append(current)
            parts.append([])
            current = 0
        table.append((name, str(t.dtype), tuple(t.shape), len(parts) - 1, current))
        parts[-1].append(t.reshape(-1).view(torch.uint8))
        current += n
    sizes.append(current)
    buckets = [torch.cat(p) if p else torch.empty(0, dtype=torch.uint8) for p in parts]
    return WeightPacket(version, what, table, sizes, buckets, base_fingerprint)


def unpack(packet: WeightPacket, buckets: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    buckets = packet.buckets if buckets is None else buckets
    if buckets is None or len(buckets) != len(packet.bucket_sizes):
        raise ValueError(f"weight packet v{packet.version}: expected {len(packet.bucket_sizes)} buckets")
    out = {}
    for name, dtype, shape, b, offset in packet.table:
        dt = _DTYPES[dtype]
        numel = 1
        for s in shape:
            numel *= s
        n = numel * torch.tensor([], dtype=dt).element_size()
        out[name] = buckets[b][offset : offset + n].view(dt).reshape(shape).clone()
    return out


class ObjectStoreTransport:
    """Buckets through Ray's object store: `publish` returns (handle, ref); workers get the ref."""

    name = "object_store"

    def publish(self, packet: WeightPacket):
        import ray

        return packet.handle(), ray.put(packet.buckets)

    def receive(self, handle: WeightPacket, payload) -> dict[str, torch.Tensor]:
        # `payload` is the bucket list itself: Ray resolved the top-level ObjectRef argument.
        return unpack(handle, payload)


class WeightGroupError(RuntimeError):
    """A generation of the weight-broadcast group failed for this member, which is alive: the driver
    aborted it (another member died or hung), a peer's connection closed, or it timed out. The driver
    forms a new generation and broadcasts again."""


def connect_store(host: str, port: int, timeout_s: float):
    """A client connection to the broadcast groups' store (each use gets its own: a TCPStore client
    serialises its requests, so a rendezvous stuck on a dead member would block anything sharing it)."""
    import datetime

    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def abort_key(generation: int) -> str:
    return f"weights/abort/{generation}"


def abort_generation(store, generation: int) -> None:
    """Tell every member of `generation` to give up whatever it waits for in that group."""
    store.set(abort_key(generation), "1")


# Groups given up with an operation pending (on a peer that died): kept until the operation ends by
# the group's own timeout, since destroying a gloo group joins its worker threads, stuck in it.
_abandoned: list[tuple[object, list]] = []


def _reap_abandoned() -> None:
    _abandoned[:] = [(g, works) for g, works in _abandoned if not all(w.is_completed() for w in works)]


class CollectiveGroup:
    """One member of a weight-broadcast process group: learner rank 0 is rank 0, rollout workers
    1..N. Built directly on a TCPStore the learner hosts (not on the default process group, which
    belongs to the learners' gradients), one group per membership generation, so scaling the rollout
    workers forms a new group instead of tearing anything down.

    The rendezvous runs in a thread on a store connection of its own, and every operation is waited
    for by polling, looking every `poll_s` for the generation's abort key on another connection
    (`control`): a member never blocks on a dead peer for longer than it takes the driver to see the
    death. `timeout_s` bounds everything as a last resort (gloo's own timeout included)."""

    poll_s = 0.05

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        generation: int,
        backend: str,
        timeout_s: float = 300.0,
    ):
        import datetime

        import torch.distributed as dist

        _reap_abandoned()
        self.rank, self.world_size, self.generation, self.backend = rank, world_size, generation, backend
        self.timeout_s = timeout_s
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        try:  # checks and nothing that blocks, so a short timeout: the store is up before anyone joins
            self.control = connect_store(host, port, min(timeout_s, 30.0))
        except Exception as exc:
            raise WeightGroupError(f"weight group generation {generation}: no store at {host}:{port}: {exc}") from exc
        made: dict = {}

        def rendezvous() -> None:
            try:
                store = dist.PrefixStore(f"weights/{generation}", connect_store(host, port, timeout_s))
                if backend == "nccl":
                    group = dist.ProcessGroupNCCL(store, rank, world_size)
                else:
                    group = dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))
                # One tiny broadcast, here in the thread: NCCL connects on its first collective, and it
                # proves the group whole before any bucket is sent.
                group.broadcast(torch.zeros(1, device=self.device), 0).wait()
                made["group"] = group
            except Exception as exc:  # noqa: BLE001 - reported to the waiting member below
                made["error"] = exc

        thread = threading.Thread(target=rendezvous, name=f"weights-rendezvous-{generation}", daemon=True)
        thread.start()
        self._wait(lambda: not thread.is_alive(), "the rendezvous")
        if "error" in made:
            raise WeightGroupError(
                f"weight group generation {generation}: the rendezvous failed on rank {rank}: {made['error']}"
            ) from made["error"]
        self.group = made["group"]

    @staticmethod
    def host_store(host: str, port: int, timeout_s: float = 300.0):
        import datetime

        import torch.distributed as dist

        return dist.TCPStore(
            host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done` until it holds; WeightGroupError when the driver aborts the generation first,
        or after `timeout_s`."""
        start = time.monotonic()
        next_look, nap = start, 0.0002
        while not done():
            now = time.monotonic()
            if now >= next_look:
                if self.control.check([abort_key(self.generation)]):
                    raise WeightGroupError(f"weight group generation {self.generation} aborted during {what}")
                if now - start > self.timeout_s:
                    raise WeightGroupError(
                        f"weight group generation {self.generation}: {what} took longer than {self.timeout_s:g} s"
                    )
                next_look = now + self.poll_s
            time.sleep(nap)
            nap = min(nap * 2, 0.005)

    def _broadcast(self, tensors: list[torch.Tensor], what: str) -> None:
        """Every bucket's broadcast at once (ops match across ranks by order), then one wait."""
        if self.group is None:
            raise WeightGroupError(f"weight group generation {self.generation} failed earlier on rank {self.rank}")
        works = [self.group.broadcast(t, 0) for t in tensors]
        try:
            self._wait(lambda: all(w.is_completed() for w in works), what)
            for w in works:
                w.wait()
        except Exception as exc:
            self._abandon(works)
            if isinstance(exc, WeightGroupError):
                raise
            raise WeightGroupError(
                f"weight group generation {self.generation}: {what} failed on rank {self.rank}: {exc}"
            ) from exc

    def _abandon(self, works: list) -> None:
        group, self.group = self.group, None
        if self.backend == "nccl":
            try:  # NCCL can cancel its kernels; gloo's abort leaves a pending receive waiting anyway
                group.abort()
            except Exception:  # noqa: BLE001 - best effort: it is never used again
                pass
        _abandoned.append((group, works))

    def send(self, packet: WeightPacket) -> None:
        self._broadcast([b.to(self.device) for b in packet.buckets], f"the broadcast of v{packet.version}")

    def receive(self, handle: WeightPacket) -> dict[str, torch.Tensor]:
        buckets = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in handle.bucket_sizes]
        self._broadcast(buckets, f"the broadcast of v{handle.version}")
        return unpack(handle, [b.cpu() for b in buckets])
