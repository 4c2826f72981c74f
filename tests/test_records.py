"""The rollout-group record: exact round trips, and refusal of truncated, altered or unsafe bytes."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from common.records import SCHEMA_VERSION, RecordError, RolloutGroup
from tests.conftest import make_sampler


@pytest.fixture(scope="module")
def group(tiny_model):
    sampler = make_sampler(tiny_model)
    text = torch.randn(1, 8, 16)
    fork = sampler.fork(text, sampler.noise_plan(1), pivot=1, group_size=4, sigma=0.5, fork_seed=2)
    components = {"vq": torch.rand(4), "ta": torch.rand(4)}
    return RolloutGroup.from_fork(fork, prompt="a red circle moving left on a black background",
                                  rewards=components["vq"] + components["ta"], reward_components=components,
                                  policy_version=7, keep_videos=True, extra={"worker": "rollout-0"})


def _assert_same(a: RolloutGroup, b: RolloutGroup):
    for name in ("prompt", "pivot", "sigma", "plan_seed", "fork_seed", "policy_version", "adapter", "group_id", "extra"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "rewards"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.reward_components.keys() == b.reward_components.keys()
    for k in a.reward_components:
        assert torch.equal(a.reward_components[k], b.reward_components[k])


def test_round_trip_is_exact(group):
    back = RolloutGroup.from_bytes(group.to_bytes())
    _assert_same(group, back)
    assert torch.equal(back.videos, group.videos)
    assert back.pivot_latents.shape == (4, 4, 2, 8, 8)
    lean = RolloutGroup.from_bytes(RolloutGroup(**{**group.__dict__, "videos": None}).to_bytes())
    assert lean.videos is None
    assert len(lean.to_bytes()) < len(group.to_bytes())


def test_bfloat16_round_trip(group):
    half = RolloutGroup(**{**group.__dict__, "pivot_inputs": group.pivot_inputs.bfloat16(),
                           "pivot_predictions": group.pivot_predictions.bfloat16()})
    _assert_same(half, RolloutGroup.from_bytes(half.to_bytes()))


def test_truncation_anywhere_is_refused(group):
    data = group.to_bytes()
    for cut in (3, 12, 40, len(data) // 2, len(data) - 33, len(data) - 1):
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(data[:cut])


@pytest.mark.parametrize("where", [0.02, 0.1, 0.5, 0.9, 0.999])
def test_any_flipped_byte_is_refused(group, where):
    data = bytearray(group.to_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x01
    with pytest.raises(RecordError):
        RolloutGroup.from_bytes(bytes(data))


def test_magic_and_version(group):
    data = group.to_bytes()
    with pytest.raises(RecordError, match="magic"):
        RolloutGroup.from_bytes(b"XX" + data[2:])
    future = bytearray(data)
    future[7:9] = (SCHEMA_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(RecordError, match=f"version {SCHEMA_VERSION + 1} \\(expected {SCHEMA_VERSION}\\)"):
        RolloutGroup.from_bytes(bytes(future))


def test_keyed_records(group):
    data = group.to_bytes(key=b"secret")
    _assert_same(group, RolloutGroup.from_bytes(data, key=b"secret"))
    with pytest.raises(RecordError, match="digest"):
        RolloutGroup.from_bytes(data, key=b"other")
    with pytest.raises(RecordError, match="key"):
        RolloutGroup.from_bytes(data)
    with pytest.raises(RecordError, match="key"):
        RolloutGroup.from_bytes(group.to_bytes(), key=b"secret")


def test_non_finite_rewards_refused_on_build_and_on_decode(group):
    bad = group.rewards.clone()
    bad[2] = float("nan")
    with pytest.raises(RecordError, match=r"rewards is not finite for branch\(es\) \[2\]"):
        RolloutGroup(**{**group.__dict__, "rewards": bad})
    comp = dict(group.reward_components, ta=torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(RecordError, match="'ta'"):
        RolloutGroup(**{**group.__dict__, "reward_components": comp})
    # A writer that skipped validation, with a correct digest: decoding validates again.
    sneaky = RolloutGroup.__new__(RolloutGroup)
    sneaky.__dict__.update({**group.__dict__, "rewards": bad})
    with pytest.raises(RecordError, match="not finite"):
        RolloutGroup.from_bytes(sneaky.to_bytes())


def test_inconsistent_shapes_refused(group):
    with pytest.raises(RecordError, match="prefix_latents"):
        RolloutGroup(**{**group.__dict__, "prefix_latents": group.prefix_latents[:, :, :1]})
    with pytest.raises(RecordError, match="rewards"):
        RolloutGroup(**{**group.__dict__, "rewards": group.rewards[:3]})


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_payload_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    with pytest.raises(RecordError):
        RolloutGroup.from_bytes(payload)
    # Even framed with a valid digest, the body is parsed as JSON and safetensors, never unpickled.
    from common.records import _BLOB_LEN, _PREFIX, MAGIC

    head = b"{}"
    body = _PREFIX.pack(MAGIC, SCHEMA_VERSION, False, len(head)) + head + _BLOB_LEN.pack(len(payload)) + payload
    with pytest.raises(RecordError):
        RolloutGroup.from_bytes(body + hashlib.blake2b(body, digest_size=32).digest())
    assert not marker.exists()
