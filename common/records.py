"""The rollout-group record: what a rollout worker produces and the learner and replay buffer keep.

Records cross process boundaries (Ray, Redis), so they have a byte format that never unpickles:

    magic "ARCOPO\\0" | u16 schema version | u8 keyed | u32 header length | JSON header |
    u64 blob length | safetensors blob | 32-byte blake2b digest of everything before it

The digest is checked before anything is parsed, so truncated or altered bytes are refused before
they reach a JSON or safetensors parser; with a key, the digest is keyed, so a party without the key
cannot forge a record. Decoding then checks the tensors against the header and validates the group
(shapes agree, rewards finite): a record that decodes is one the learner can train on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import uuid
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SCHEMA_VERSION = 1
MAGIC = b"ARCOPO\x00"
_PREFIX = struct.Struct("<7sHBI")  # magic, version, keyed, header length
_BLOB_LEN = struct.Struct("<Q")
_DIGEST = 32
_TENSORS = ("prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "rewards")
_SCALARS = ("group_id", "prompt", "pivot", "sigma", "plan_seed", "fork_seed", "policy_version", "adapter")


class RecordError(ValueError):
    """Bytes or a group that must not be trained on; the message says why."""


@dataclass
class RolloutGroup:
    prompt: str
    pivot: int
    sigma: float
    plan_seed: int
    fork_seed: int
    policy_version: int
    prefix_latents: torch.Tensor  # [1, C, pivot * f, H, W]
    pivot_inputs: torch.Tensor  # [G, T, C, f, H, W]
    pivot_predictions: torch.Tensor  # [G, T, C, f, H, W]
    pivot_latents: torch.Tensor  # [G, C, f, H, W]
    rewards: torch.Tensor  # [G], the weighted total
    reward_components: dict[str, torch.Tensor]  # name -> [G]
    adapter: str = "on_policy"
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra: dict[str, str | int | float | bool] = field(default_factory=dict)
    videos: torch.Tensor | None = None  # [G, C, F, H, W]; large, left out unless asked for

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_fork(cls, group, *, prompt: str, rewards: torch.Tensor, reward_components: dict[str, torch.Tensor],
                  policy_version: int, keep_videos: bool = False, **kw) -> "RolloutGroup":
        f = group.pivot_inputs.shape[-3]
        start = group.pivot * f
        return cls(
            prompt=prompt, pivot=group.pivot, sigma=float(group.sigma), plan_seed=group.plan_seed,
            fork_seed=group.fork_seed, policy_version=policy_version,
            prefix_latents=group.prefix_latents, pivot_inputs=group.pivot_inputs,
            pivot_predictions=group.pivot_predictions, pivot_latents=group.videos[:, :, start : start + f],
            rewards=rewards, reward_components=reward_components,
            videos=group.videos if keep_videos else None, **kw,
        )

    @property
    def group_size(self) -> int:
        return self.pivot_inputs.shape[0]

    def validate(self) -> None:
        G = self.group_size
        if self.pivot_inputs.ndim != 6 or self.pivot_predictions.shape != self.pivot_inputs.shape:
            raise RecordError(
                f"pivot_inputs {tuple(self.pivot_inputs.shape)} and pivot_predictions "
                f"{tuple(self.pivot_predictions.shape)} must both be [G, T, C, f, H, W]")
        _, _, C, f, H, W = self.pivot_inputs.shape
        if tuple(self.pivot_latents.shape) != (G, C, f, H, W):
            raise RecordError(f"pivot_latents must be {(G, C, f, H, W)}, got {tuple(self.pivot_latents.shape)}")
        if tuple(self.prefix_latents.shape) != (1, C, self.pivot * f, H, W):
            raise RecordError(f"prefix_latents must be {(1, C, self.pivot * f, H, W)} for pivot {self.pivot}, "
                              f"got {tuple(self.prefix_latents.shape)}")
        if self.videos is not None and (self.videos.shape[0] != G or self.videos.shape[1] != C):
            raise RecordError(f"videos must be [G={G}, C={C}, F, H, W], got {tuple(self.videos.shape)}")
        for name, value in [("rewards", self.rewards), *(
                (f"reward component {k!r}", v) for k, v in self.reward_components.items())]:
            if tuple(value.shape) != (G,):
                raise RecordError(f"{name} must have shape ({G},), got {tuple(value.shape)}")
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                raise RecordError(f"{name} is not finite for branch(es) {bad}")
        if not math.isfinite(self.sigma):
            raise RecordError("sigma is not finite")

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in _TENSORS}
        tensors.update({f"reward/{k}": v for k, v in self.reward_components.items()})
        if self.videos is not None:
            tensors["videos"] = self.videos
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values()) + 4096

    def to_bytes(self, key: bytes | None = None) -> bytes:
        tensors = self._tensors()
        header = {name: getattr(self, name) for name in _SCALARS}
        header.update(schema_version=SCHEMA_VERSION, components=sorted(self.reward_components), extra=self.extra,
                      tensors={k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()})
        head = json.dumps(header, sort_keys=True).encode()
        blob = st_save(tensors)
        body = _PREFIX.pack(MAGIC, SCHEMA_VERSION, key is not None, len(head)) + head + _BLOB_LEN.pack(len(blob)) + blob
        return body + _digest(body, key)

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes | None = None) -> "RolloutGroup":
        data = bytes(data)
        if len(data) < _PREFIX.size + _BLOB_LEN.size + _DIGEST:
            raise RecordError(f"record truncated: {len(data)} bytes")
        magic, version, keyed, head_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise RecordError("not a rollout-group record (bad magic)")
        if version != SCHEMA_VERSION:
            raise RecordError(f"unsupported record schema version {version} (expected {SCHEMA_VERSION})")
        if bool(keyed) != (key is not None):
            raise RecordError("record was written with an authentication key" if keyed
                              else "record carries no authentication key but one was expected")
        blob_at = _PREFIX.size + head_len
        if len(data) < blob_at + _BLOB_LEN.size + _DIGEST:
            raise RecordError("record truncated inside its header")
        (blob_len,) = _BLOB_LEN.unpack_from(data, blob_at)
        end = blob_at + _BLOB_LEN.size + blob_len
        if len(data) != end + _DIGEST:
            raise RecordError(f"record truncated or padded: {len(data)} bytes, expected {end + _DIGEST}")
        if not hmac.compare_digest(_digest(data[:end], key), data[end:]):
            raise RecordError("record digest mismatch: the bytes were altered or the key is wrong")
        try:
            header = json.loads(data[_PREFIX.size:blob_at])
            tensors = st_load(data[blob_at + _BLOB_LEN.size:end])
        except (ValueError, UnicodeDecodeError, SafetensorError) as exc:  # only reachable with a valid digest, i.e. a bad writer
            raise RecordError(f"record body unreadable: {exc}") from None
        declared = header.get("tensors", {})
        found = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}
        if declared != found:
            raise RecordError(f"record tensors {sorted(found)} do not match its header {sorted(declared)}")
        missing = [k for k in (*_SCALARS, "components", "extra") if k not in header]
        missing += [k for k in _TENSORS if k not in tensors]
        if missing:
            raise RecordError(f"record misses field(s) {missing}")
        try:
            return cls(
                **{k: header[k] for k in _SCALARS},
                **{k: tensors[k] for k in _TENSORS},
                reward_components={k: tensors[f"reward/{k}"] for k in header["components"]},
                extra=header["extra"], videos=tensors.get("videos"),
            )
        except (KeyError, TypeError) as exc:
            raise RecordError(f"record fields inconsistent: {exc!r}") from None


def _digest(body: bytes, key: bytes | None) -> bytes:
    return hashlib.blake2b(body, digest_size=_DIGEST, key=key or b"").digest()
