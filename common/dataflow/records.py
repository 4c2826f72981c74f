"""The rollout-group record: what a rollout worker produces and the learner and replay buffer keep.

Records cross process boundaries (Ray, Redis), so they have a byte format that never unpickles:

    magic "ARCOPO\\0" | u16 schema version | u8 keyed | u32 header length | JSON header |
    u64 blob length | safetensors blob | 32-byte blake2b digest of everything before it

The digest is checked before anything is parsed, so truncated or altered bytes are refused before
they reach a JSON or safetensors parser. Unkeyed, the digest only catches accidents (anyone can
recompute it); with a key it authenticates, so a party without the key cannot forge a record. The
keyed flag is covered by the digest and must match the decoder's expectation, so a reader that
holds a key never accepts an unkeyed record. Decoding then checks the tensors against the header
and validates the group (types, shapes agree, rewards finite): a record that decodes is one the
learner can train on.
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
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SCHEMA_VERSION = 1
MAGIC = b"ARCOPO\x00"
_PREFIX = struct.Struct("<7sHBI")  # magic, version, keyed, header length
_BLOB_LEN = struct.Struct("<Q")
_DIGEST = 32
_TENSORS = ("prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "rewards")
_INTS = ("pivot", "plan_seed", "fork_seed", "policy_version")
_STRS = ("group_id", "prompt", "adapter")
_SCALARS = (*_STRS, *_INTS, "sigma")
_COMPONENT = "reward/"  # safetensors name prefix of a reward component
_LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RecordError(ValueError):
    """Bytes or a group that must not be trained on; the message says why."""


@dataclass
class RolloutGroup:
    prompt: str
    pivot: int  # 0-based chunk index
    sigma: float
    plan_seed: int
    fork_seed: int
    policy_version: int
    prefix_latents: torch.Tensor  # [1, C, pivot * f, H, W]
    pivot_inputs: torch.Tensor  # [G, T, C, f, H, W]
    pivot_predictions: torch.Tensor  # [G, T, C, f, H, W]
    pivot_latents: torch.Tensor  # [G, C, f, H, W]
    rewards: torch.Tensor  # [G] float32, the weighted total
    reward_components: dict[str, torch.Tensor]  # name -> [G] float32
    adapter: str = "on_policy"
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra: dict[str, str | int | float | bool] = field(default_factory=dict)
    videos: torch.Tensor | None = None  # [G, C, F, H, W]; large, left out unless asked for

    def __post_init__(self) -> None:
        if type(self.sigma) is int:  # JSON would bring it back as an int; keep the field a float
            self.sigma = float(self.sigma)
        self.validate()

    @classmethod
    def from_fork(
        cls,
        group,
        prompt: str,
        rewards: torch.Tensor,
        reward_components: dict[str, torch.Tensor],
        policy_version: int,
        *,
        keep_videos: bool = False,
        **kw,
    ) -> RolloutGroup:
        """The record of a `ForkedGroup` and its scores; whole videos only with `keep_videos`."""
        f = group.pivot_inputs.shape[-3]
        start = group.pivot * f
        return cls(
            prompt=prompt,
            pivot=group.pivot,
            sigma=float(group.sigma),
            plan_seed=group.plan_seed,
            fork_seed=group.fork_seed,
            policy_version=policy_version,
            prefix_latents=group.prefix_latents,
            pivot_inputs=group.pivot_inputs,
            pivot_predictions=group.pivot_predictions,
            # A copy, not a view: a view would keep the whole videos alive after they are dropped.
            pivot_latents=group.videos[:, :, start : start + f].clone(),
            rewards=rewards,
            reward_components=reward_components,
            videos=group.videos if keep_videos else None,
            **kw,
        )

    @property
    def group_size(self) -> int:
        return self.pivot_inputs.shape[0]

    def validate(self) -> None:
        """Raise RecordError unless this group is well-typed, self-consistent and has finite rewards."""
        for name in _STRS:
            if not isinstance(getattr(self, name), str):
                raise RecordError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in _INTS:
            if type(getattr(self, name)) is not int:  # bool is an int subclass; refuse it too
                raise RecordError(f"{name} must be an int, got {type(getattr(self, name)).__name__}")
        if self.pivot < 0:
            raise RecordError(f"pivot must be >= 0, got {self.pivot}")
        if type(self.sigma) is not float or not math.isfinite(self.sigma):
            raise RecordError(f"sigma must be a finite float, got {self.sigma!r}")
        _check_extra(self.extra)
        names = self.reward_components if isinstance(self.reward_components, dict) else [None]
        if not all(isinstance(k, str) and k for k in names):
            raise RecordError("reward_components must be a dict of non-empty name -> tensor")
        for name in (*_TENSORS, "videos"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) and not (name == "videos" and value is None):
                raise RecordError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        for name in ("prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "videos"):
            value = getattr(self, name)
            if value is not None and value.dtype not in _LATENT_DTYPES:
                raise RecordError(f"{name} must be float32, bfloat16 or float16, got {value.dtype}")

        G = self.group_size
        if self.pivot_inputs.ndim != 6 or self.pivot_predictions.shape != self.pivot_inputs.shape:
            raise RecordError(
                f"pivot_inputs {tuple(self.pivot_inputs.shape)} and pivot_predictions "
                f"{tuple(self.pivot_predictions.shape)} must both be [G, T, C, f, H, W]"
            )
        _, _, C, f, H, W = self.pivot_inputs.shape
        if G < 1 or f < 1:
            raise RecordError(f"pivot_inputs {tuple(self.pivot_inputs.shape)} has no branch or no frame")
        if tuple(self.pivot_latents.shape) != (G, C, f, H, W):
            raise RecordError(f"pivot_latents must be {(G, C, f, H, W)}, got {tuple(self.pivot_latents.shape)}")
        if tuple(self.prefix_latents.shape) != (1, C, self.pivot * f, H, W):
            raise RecordError(
                f"prefix_latents must be {(1, C, self.pivot * f, H, W)} for pivot {self.pivot}, "
                f"got {tuple(self.prefix_latents.shape)}"
            )
        if self.videos is not None:
            v = tuple(self.videos.shape)
            if len(v) != 5 or v[:2] != (G, C) or v[3:] != (H, W) or v[2] % f or v[2] <= self.pivot * f:
                raise RecordError(
                    f"videos must be [G={G}, C={C}, F, H={H}, W={W}] with F whole chunks of "
                    f"{f} frames past pivot {self.pivot}, got {v}"
                )

        for name, value in [
            ("rewards", self.rewards),
            *((f"reward component {k!r}", v) for k, v in self.reward_components.items()),
        ]:
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                raise RecordError(f"{name} must be a float32 tensor, got {getattr(value, 'dtype', type(value))}")
            if tuple(value.shape) != (G,):
                raise RecordError(f"{name} must have shape ({G},), got {tuple(value.shape)}")
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                raise RecordError(f"{name} is not finite for branch(es) {bad}")

    # -- bytes ------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in _TENSORS}
        tensors.update({_COMPONENT + k: v for k, v in self.reward_components.items()})
        if self.videos is not None:
            tensors["videos"] = self.videos
        return tensors

    def _header(self, tensors: dict[str, torch.Tensor]) -> bytes:
        header = {name: getattr(self, name) for name in _SCALARS}
        header.update(
            schema_version=SCHEMA_VERSION,
            components=sorted(self.reward_components),
            extra=self.extra,
            tensors={k: _meta(v) for k, v in tensors.items()},
        )
        return json.dumps(header, sort_keys=True, allow_nan=False).encode()

    def nbytes(self) -> int:
        """About len(self.to_bytes()), from shapes alone (nothing is copied or moved off the device)."""
        tensors = self._tensors()
        head = len(self._header(tensors))
        # The safetensors header repeats names, dtypes and shapes, plus offsets: bounded by ours + 64 a tensor.
        blob = sum(t.numel() * t.element_size() for t in tensors.values()) + head + 64 * len(tensors)
        return _PREFIX.size + head + _BLOB_LEN.size + blob + _DIGEST

    def to_bytes(self, key: bytes | None = None) -> bytes:
        _check_key(key)
        self.validate()  # fields may have been reassigned since construction
        tensors, seen = {}, set()
        for name, value in self._tensors().items():
            value = value.detach().to("cpu").contiguous()
            # safetensors refuses tensors that share storage (rewards may *be* a component): copy those.
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen and value.numel():
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
            tensors[name] = value
        head = self._header(tensors)
        blob = st_save(tensors)
        body = _PREFIX.pack(MAGIC, SCHEMA_VERSION, key is not None, len(head)) + head + _BLOB_LEN.pack(len(blob)) + blob
        return body + _digest(body, key)

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes | None = None) -> RolloutGroup:
        _check_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RecordError(f"a record is bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data.startswith(MAGIC):
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                raise RecordError(f"record truncated: {len(data)} bytes")
            raise RecordError("not a rollout-group record (wrong magic)")
        if len(data) < _PREFIX.size + _BLOB_LEN.size + _DIGEST:
            raise RecordError(f"record truncated: {len(data)} bytes")
        _, version, keyed, head_len = _PREFIX.unpack_from(data)
        if version != SCHEMA_VERSION:
            raise RecordError(f"unsupported record schema version {version} (expected {SCHEMA_VERSION})")
        if bool(keyed) != (key is not None):
            raise RecordError(
                "record was written with an authentication key; pass key= to decode it"
                if keyed
                else "record carries no authentication key but one was expected: refusing it"
            )
        blob_at = _PREFIX.size + head_len
        if len(data) < blob_at + _BLOB_LEN.size + _DIGEST:
            raise RecordError(f"record truncated inside its header: {len(data)} bytes, header ends at {blob_at}")
        (blob_len,) = _BLOB_LEN.unpack_from(data, blob_at)
        end = blob_at + _BLOB_LEN.size + blob_len
        if len(data) != end + _DIGEST:
            raise RecordError(f"record truncated or padded: {len(data)} bytes, expected {end + _DIGEST}")
        if not hmac.compare_digest(_digest(data[:end], key), data[end:]):
            why = " or the key is wrong" if key else ""
            raise RecordError(f"record digest (checksum) mismatch: the bytes were altered{why}")

        # Past the digest, the bytes are what some writer produced; unkeyed, that writer may be anyone.
        # Both parsers are pickle-free; whatever they raise on malformed input is a bad record.
        try:
            header = json.loads(data[_PREFIX.size : blob_at])
        except (ValueError, RecursionError) as exc:
            raise RecordError(f"record header is not JSON: {exc}") from None
        try:
            tensors = st_load(data[blob_at + _BLOB_LEN.size : end])
        except Exception as exc:
            raise RecordError(f"record tensor blob is not valid safetensors: {exc}") from None
        return cls._from_parts(header, tensors, version)

    @classmethod
    def _from_parts(cls, header, tensors: dict[str, torch.Tensor], version: int) -> RolloutGroup:
        if not isinstance(header, dict):
            raise RecordError(f"record header must be a JSON object, got {type(header).__name__}")
        missing = [k for k in (*_SCALARS, "schema_version", "components", "extra", "tensors") if k not in header]
        if missing:
            raise RecordError(f"record header misses field(s) {missing}")
        if header["schema_version"] != version:
            raise RecordError(f"record header says schema version {header['schema_version']!r}, frame says {version}")
        components = header["components"]
        if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
            raise RecordError("record header 'components' must be a list of names")
        declared = header["tensors"]
        found = {k: _meta(v) for k, v in tensors.items()}
        if not isinstance(declared, dict):
            raise RecordError("record header 'tensors' must map names to [dtype, shape]")
        if declared != found:
            diff = sorted(k for k in found.keys() | declared.keys() if declared.get(k) != found.get(k))
            raise RecordError(f"record tensors do not match its header (names, dtypes or shapes) for {diff}")
        expected = {*_TENSORS, *(_COMPONENT + c for c in components)}
        missing = sorted(expected - found.keys())
        unknown = sorted(found.keys() - expected - {"videos"})
        if missing or unknown:
            raise RecordError(f"record tensors: missing {missing}, unexpected {unknown}")
        return cls(
            **{k: header[k] for k in _SCALARS},
            **{k: tensors[k] for k in _TENSORS},
            reward_components={c: tensors[_COMPONENT + c] for c in components},
            extra=header["extra"],
            videos=tensors.get("videos"),
        )


def _meta(t: torch.Tensor) -> list:
    return [str(t.dtype).removeprefix("torch."), list(t.shape)]


def _check_extra(extra) -> None:
    if not isinstance(extra, dict):
        raise RecordError(f"extra must be a dict, got {type(extra).__name__}")
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            raise RecordError(f"extra[{k!r}] must map a str to a str, int, float or bool, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise RecordError(f"extra[{k!r}] is not finite")  # JSON has no NaN/inf


def _check_key(key) -> None:
    # An empty blake2b key is no key: it would give the unkeyed digest under the keyed flag.
    if key is not None and not (isinstance(key, bytes) and 1 <= len(key) <= 64):
        raise ValueError("key must be 1 to 64 bytes (blake2b's key size) or None")


def _digest(body: bytes, key: bytes | None) -> bytes:
    return hashlib.blake2b(body, digest_size=_DIGEST, key=key or b"").digest()
