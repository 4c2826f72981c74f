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
"""

from __future__ import annotations

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


class CollectiveGroup:
    """One member of a weight-broadcast process group: learner rank 0 is rank 0, rollout workers
    1..N. Built directly on a TCPStore the learner hosts (not on the default process group, which
    belongs to the learners' gradients), one group per membership generation, so scaling the rollout
    workers forms a new group instead of tearing anything down."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        generation: int,
        backend: str,
        store=None,
        timeout_s: float = 300.0,
    ):
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.generation = rank, world_size, generation
        self.store = store if store is not None else dist.TCPStore(host, port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(f"weights/{generation}", self.store)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")

    @staticmethod
    def host_store(host: str, port: int, timeout_s: float = 300.0):
        import datetime

        import torch.distributed as dist

        return dist.TCPStore(
            host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )

    def send(self, packet: WeightPacket) -> None:
        for bucket in packet.buckets:
            self.group.broadcast(bucket.to(self.device), 0).wait()

    def receive(self, handle: WeightPacket) -> dict[str, torch.Tensor]:
        buckets = []
        for size in handle.bucket_sizes:
            bucket = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.group.broadcast(bucket, 0).wait()
            buckets.append(bucket.cpu())
        return unpack(handle, buckets)
