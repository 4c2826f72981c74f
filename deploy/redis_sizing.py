#!/usr/bin/env python3
"""How much Redis memory a replay buffer of N rollout groups needs (docs/redis.md explains every term).

Standalone on purpose (no import of the project): the arithmetic below mirrors the byte layout of
`common/dataflow/records.py` (one group = one record) and the key layout of
`common/dataflow/replay.py` (a record is stored as parts of at most `replay.max_value_bytes` bytes,
plus a meta hash and index entries), and Redis 6.2/7.x with jemalloc (every allocation is rounded up
to a jemalloc size class).
tests/test_deploy.py checks it against a real redis-server.

    python deploy/redis_sizing.py --config configs/self_forcing_wan1.3b.yaml --capacity 100
    python deploy/redis_sizing.py --G 12 --T 4 --C 16 --f 3 --H 60 --W 104 --chunks 7 --capacity 100

As a module (tests, notebooks): `import redis_sizing` with deploy/ on sys.path, then
`record_bytes(...)`, `item_memory_bytes(...)`, `buffer_memory_bytes(...)`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

# -- one record: common/dataflow/records.py ---------------------------------------------------------

_PREFIX = 7 + 2 + 1 + 4  # magic "ARCOPO\0", u16 schema version, u8 keyed, u32 header length
_BLOB_LEN = 8  # u64 safetensors blob length
_DIGEST = 32  # blake2b
_DTYPES = {4: ("float32", "F32"), 2: ("bfloat16", "BF16")}


@dataclass(frozen=True)
class GroupShape:
    """One forked group as the rollout worker records it (all latents float32 by default)."""

    G: int  # algorithm.group_size
    T: int  # len(sampler.denoising_steps)
    C: int  # latent channels (model.transformer.in_channels)
    f: int  # sampler.frames_per_chunk (latent frames)
    H: int  # latent height = sampler.height / model.vae_spatial_stride
    W: int  # latent width
    pivot: int  # 0-based pivot chunk: the prefix holds pivot * f frames
    components: int = 3  # reward components (rewards.terms)
    prompt_chars: int = 80
    dtype_bytes: int = 4  # the sampler records float32 inputs and predictions

    def tensors(self) -> dict[str, tuple[int, ...]]:
        G, T, C, f, H, W = self.G, self.T, self.C, self.f, self.H, self.W
        shapes = {
            "prefix_latents": (1, C, self.pivot * f, H, W),
            "pivot_inputs": (G, T, C, f, H, W),  # x_t per step
            "pivot_predictions": (G, T, C, f, H, W),  # x0_hat of the behaviour policy per step
            "pivot_latents": (G, C, f, H, W),
            "rewards": (G,),
        }
        shapes.update({f"reward/c{i}": (G,) for i in range(self.components)})
        return shapes


def tensor_bytes(shape: GroupShape) -> int:
    """Raw tensor bytes: dtype x (C p f H W + 2 G T C f H W + G C f H W) + 4 G (1 + components)."""
    total = 0
    for name, dims in shape.tensors().items():
        size = 4 if name.startswith("reward") else shape.dtype_bytes
        total += size * math.prod(dims)
    return total


def record_bytes(shape: GroupShape) -> int:
    """len(RolloutGroup.to_bytes()) to within a few bytes: frame + JSON header + safetensors + digest."""
    dtype, st_dtype = _DTYPES[shape.dtype_bytes]
    tensors = shape.tensors()
    meta = {k: [("float32" if k.startswith("reward") else dtype), list(v)] for k, v in tensors.items()}
    header = {
        "group_id": "0" * 32,
        "prompt": "x" * shape.prompt_chars,
        "adapter": "on_policy",
        "pivot": shape.pivot,
        "plan_seed": 10**9,
        "fork_seed": 10**9,
        "policy_version": 100,
        "sigma": 0.5,
        "schema_version": 1,
        "components": [f"c{i}" for i in range(shape.components)],
        "extra": {},
        "tensors": meta,
    }
    head = len(json.dumps(header, sort_keys=True))
    offset, st_header = 0, {}
    for name, dims in tensors.items():
        n = (4 if name.startswith("reward") else shape.dtype_bytes) * math.prod(dims)
        st_header[name] = {
            "dtype": "F32" if name.startswith("reward") else st_dtype,
            "shape": list(dims),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    st_head = len(json.dumps(st_header, separators=(",", ":")))
    st_head += -st_head % 8  # safetensors pads its header to 8 bytes
    blob = 8 + st_head + offset
    return _PREFIX + head + _BLOB_LEN + blob + _DIGEST


# -- one item in Redis: common/dataflow/replay.py ---------------------------------------------------


def jemalloc_size(n: int) -> int:
    """The jemalloc size class an allocation of n bytes really takes (4 classes per power of two)."""
    if n <= 8:
        return 8
    if n <= 128:
        return -(-n // 16) * 16
    lg = (n - 1).bit_length() - 1  # 2^lg < n <= 2^(lg+1)
    spacing = 1 << (lg - 2)
    return -(-n // spacing) * spacing


def sds_alloc(n: int) -> int:
    """Bytes a Redis string of n bytes allocates: sds header (3/5/9) + data + NUL, size-class rounded."""
    header = 3 if n < 256 else 5 if n < 65536 else 9
    return jemalloc_size(header + n + 1)


def key_overhead(key_chars: int, *, expires: bool = False) -> int:
    """A top-level key: dictEntry (24) + redisObject (16) + the key's sds + ~8 bytes of hash table slot."""
    return 24 + 16 + sds_alloc(key_chars) + 8 + (24 + 8 if expires else 0)


# Per published item besides its parts (measured on redis 6.2.5, see tests/test_deploy.py): the meta
# hash (8 small fields, listpack/ziplist) + its key, the ':done' marker with a TTL, and one entry in
# each of the two sorted sets (skiplist + dict once a set passes 128 members): what is left after the
# meta hash and the marker, fitted on redis 6.2.5 (within 2% for 2 KB records, 0.1% for MB records).
ITEM_FIXED_BYTES = 150


def item_memory_bytes(
    record: int, max_value_bytes: int = 4 << 20, *, name_chars: int = 8, prompt_chars: int = 80
) -> int:
    """Redis used_memory of one published item whose record is `record` bytes."""
    prefix = len("arcopo::item:") + name_chars + 7  # arcopo:<name>:item:<id>, id ~ 7 digits
    full, rest = divmod(record, max_value_bytes)
    parts = [max_value_bytes] * full + ([rest] if rest else [])
    part_key = prefix + len(":part:") + 2
    data = sum(sds_alloc(n) + key_overhead(part_key) for n in parts)
    meta = key_overhead(prefix) + jemalloc_size(160 + prompt_chars + 32 + 20)
    done = key_overhead(prefix + len(":done"), expires=True)
    return data + meta + done + ITEM_FIXED_BYTES


def buffer_memory_bytes(items: int, shape: GroupShape, max_value_bytes: int = 4 << 20, *, name_chars: int = 8) -> int:
    """used_memory of `items` such groups (the counters, scripts and an empty server not included)."""
    return items * item_memory_bytes(
        record_bytes(shape), max_value_bytes, name_chars=name_chars, prompt_chars=shape.prompt_chars
    )


def overhead_factor(record: int, max_value_bytes: int = 4 << 20) -> float:
    """item_memory_bytes / record bytes: 1.0 is no overhead; 1.25 is a part size one byte past a class."""
    return item_memory_bytes(record, max_value_bytes) / record


def best_max_value_bytes(limit: int = 4 << 20) -> int:
    """`limit` if its strings waste little, else the largest part size below it whose string (sds header
    + data + NUL) fills a jemalloc size class exactly. A part of exactly 4 MiB takes the 5 MiB class
    (+25%); 4 MiB - 10 bytes takes 4 MiB."""
    header = 3 if limit < 256 else 5 if limit < 65536 else 9
    if sds_alloc(limit) - (header + limit + 1) <= limit // 64:
        return limit  # already within 1.6% of a class: keep it
    best = 0
    for header in (3, 5, 9):
        cls = jemalloc_size(limit + header + 1)
        while cls > limit + header + 1:  # step down to the class below
            lg = (cls - 1).bit_length() - 1
            cls = cls - (1 << max(lg - 2, 4)) if cls > 128 else cls - 16
        n = cls - header - 1
        if 0 < n <= limit and sds_alloc(n) == cls:
            best = max(best, n)
    return best or limit


# -- command line -------------------------------------------------------------------------------------


def _shape_from_config(path: str, overrides: list[str], pivot: int | None) -> tuple[GroupShape, dict]:
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from common.config import load_config  # the project's own resolution of defaults + overrides

    cfg = load_config(path, overrides)
    C, H, W = cfg.latent_shape
    p = (cfg.sampler.num_chunks - 1) if pivot is None else pivot
    shape = GroupShape(
        G=cfg.algorithm.group_size,
        T=len(cfg.sampler.denoising_steps),
        C=C,
        f=cfg.sampler.frames_per_chunk,
        H=H,
        W=W,
        pivot=p,
        components=len(cfg.rewards.terms),
    )
    return shape, {
        "capacity": cfg.replay.capacity,
        "max_value_bytes": cfg.replay.max_value_bytes,
        "num_chunks": cfg.sampler.num_chunks,
        "name_chars": len(cfg.run.name),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Redis memory for a replay buffer of rollout groups")
    p.add_argument("--config", help="a configs/*.yaml (needs the project importable); else give the shape")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. replay.capacity=200")
    for k in ("G", "T", "C", "f", "H", "W"):
        p.add_argument(f"--{k}", type=int)
    p.add_argument("--chunks", type=int, default=7, help="sampler.num_chunks (pivot drawn uniformly)")
    p.add_argument("--pivot", type=int, help="size for this pivot instead of mean and worst case")
    p.add_argument("--capacity", type=int, help="items (replay.capacity)")
    p.add_argument("--max-value-bytes", type=int, help="replay.max_value_bytes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.config:
        shape, info = _shape_from_config(a.config, a.overrides, a.pivot)
    else:
        missing = [k for k in ("G", "T", "C", "f", "H", "W") if getattr(a, k) is None]
        if missing:
            p.error(f"give --config or all of --G --T --C --f --H --W (missing {missing})")
        shape = GroupShape(a.G, a.T, a.C, a.f, a.H, a.W, pivot=(a.chunks - 1) if a.pivot is None else a.pivot)
        info = {"capacity": 100, "max_value_bytes": 4 << 20, "num_chunks": a.chunks, "name_chars": 8}
    capacity = a.capacity or info["capacity"]
    mvb = a.max_value_bytes or info["max_value_bytes"]
    n = info["num_chunks"]
    pivots = [a.pivot] if a.pivot is not None else list(range(n))
    per_pivot = {
        q: item_memory_bytes(
            record_bytes(GroupShape(**{**shape.__dict__, "pivot": q})), mvb, name_chars=info["name_chars"]
        )
        for q in pivots
    }
    mean_item = sum(per_pivot.values()) / len(per_pivot)
    worst_item = max(per_pivot.values())
    rec = record_bytes(shape)
    out = {
        "shape": shape.__dict__,
        "capacity": capacity,
        "max_value_bytes": mvb,
        "record_bytes_worst_pivot": rec,
        "tensor_bytes_worst_pivot": tensor_bytes(shape),
        "item_memory_mean": round(mean_item),
        "item_memory_worst": worst_item,
        "overhead_factor": round(worst_item / rec, 4),
        "buffer_used_memory_mean": round(capacity * mean_item),
        "buffer_used_memory_worst": capacity * worst_item,
        "suggested_maxmemory": math.ceil(capacity * worst_item * 1.10 + (64 << 20)),
        "better_max_value_bytes": best_max_value_bytes(mvb),
        "overhead_factor_with_better_max_value_bytes": round(overhead_factor(rec, best_max_value_bytes(mvb)), 4),
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        print(
            f"record (worst pivot {shape.pivot}): {mib(rec)}; in Redis {mib(worst_item)} "
            f"(x{out['overhead_factor']}, parts of {mvb} bytes)"
        )
        print(
            f"buffer of {capacity}: mean {mib(out['buffer_used_memory_mean'])}, "
            f"worst {mib(out['buffer_used_memory_worst'])}"
        )
        print(
            f"maxmemory >= {mib(out['suggested_maxmemory'])} (worst case + 10% + 64 MiB); "
            f"container/VM memory >= 2 x maxmemory while AOF rewrites fork (docs/redis.md)"
        )
        if out["better_max_value_bytes"] != mvb:
            print(
                f"replay.max_value_bytes={out['better_max_value_bytes']} would make the overhead "
                f"x{out['overhead_factor_with_better_max_value_bytes']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
