"""The rollout-group record: exact round trips, and refusal of truncated, altered, forged or unsafe bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.dataflow.records import MAGIC, SCHEMA_VERSION, RecordError, RolloutGroup
from tests.conftest import make_sampler

PROMPT = "a red circle moving left on a black background"
PREFIX = struct.Struct("<7sHBI")  # the documented frame: magic, version, keyed, header length
BLOB_LEN = struct.Struct("<Q")


@pytest.fixture(scope="module")
def fork(tiny_model):
    sampler = make_sampler(tiny_model)
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(7))
    return sampler.fork(text, sampler.noise_plan(1), pivot=1, group_size=4, sigma=0.5, fork_seed=2)


@pytest.fixture(scope="module")
def group(fork):
    gen = torch.Generator().manual_seed(3)
    components = {
        "vq": torch.rand(4, generator=gen),
        "mq": torch.rand(4, generator=gen),
        "ta": torch.rand(4, generator=gen),
    }
    return RolloutGroup.from_fork(
        fork,
        PROMPT,
        rewards=components["vq"] + 0.5 * components["ta"],
        reward_components=components,
        policy_version=7,
        keep_videos=True,
        extra={"worker": "rollout-0", "attempt": 2, "temperature": 0.25, "replayed": False},
    )


def _assert_same(a: RolloutGroup, b: RolloutGroup):
    scalars = ("prompt", "pivot", "sigma", "plan_seed", "fork_seed", "policy_version", "adapter", "group_id", "extra")
    for name in scalars:
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name
    tensors = ["prefix_latents", "pivot_inputs", "pivot_predictions", "pivot_latents", "rewards", "videos"]
    pairs = [(n, getattr(a, n), getattr(b, n)) for n in tensors]
    assert a.reward_components.keys() == b.reward_components.keys()
    pairs += [(k, a.reward_components[k], b.reward_components[k]) for k in a.reward_components]
    for name, x, y in pairs:
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and torch.equal(x, y), name


def _split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a valid record, by the documented layout (independently of the decoder)."""
    _, _, _, head_len = PREFIX.unpack_from(data)
    blob_at = PREFIX.size + head_len
    (blob_len,) = BLOB_LEN.unpack_from(data, blob_at)
    blob = data[blob_at + BLOB_LEN.size : blob_at + BLOB_LEN.size + blob_len]
    return json.loads(data[PREFIX.size : blob_at]), st_load(blob)


def _frame(
    header, blob, *, key: bytes | None = None, version: int = SCHEMA_VERSION, keyed: bool | None = None
) -> bytes:
    """What a writer that skips every check would send: any header and blob, with a correct digest."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob = blob if isinstance(blob, bytes) else st_save(blob)
    keyed = key is not None if keyed is None else keyed
    body = PREFIX.pack(MAGIC, version, keyed, len(head)) + head + BLOB_LEN.pack(len(blob)) + blob
    return body + hashlib.blake2b(body, digest_size=32, key=key or b"").digest()


# -- building ---------------------------------------------------------------------------------------


def test_from_fork_keeps_the_pivot_chunk_and_leaves_videos_out(fork, group):
    f = fork.pivot_inputs.shape[-3]
    assert torch.equal(group.pivot_latents, fork.videos[:, :, f : 2 * f])
    assert torch.equal(group.pivot_latents, fork.pivot_predictions[:, -1])  # the last x0_hat is the chunk
    assert group.pivot_latents.untyped_storage().data_ptr() != fork.videos.untyped_storage().data_ptr()
    assert group.group_size == 4 and group.sigma == 0.5 and group.plan_seed == 1 and group.fork_seed == 2
    lean = RolloutGroup.from_fork(fork, PROMPT, group.rewards, group.reward_components, 7)
    assert lean.videos is None and lean.adapter == "on_policy"
    assert len(lean.group_id) == 32 and lean.group_id != group.group_id


# -- round trips ------------------------------------------------------------------------------------


def test_round_trip_is_exact_with_and_without_videos(group):
    data = group.to_bytes()
    assert data == group.to_bytes()  # deterministic
    back = RolloutGroup.from_bytes(data)
    _assert_same(group, back)
    assert back.videos is not None and back.pivot_latents.shape == (4, 4, 2, 8, 8)
    _assert_same(group, RolloutGroup.from_bytes(bytearray(data)))
    _assert_same(group, RolloutGroup.from_bytes(memoryview(data)))

    lean = dataclasses.replace(group, videos=None)
    lean_data = lean.to_bytes()
    lean_back = RolloutGroup.from_bytes(lean_data)
    _assert_same(lean, lean_back)
    assert lean_back.videos is None
    assert len(data) - len(lean_data) >= group.videos.numel() * 4


def test_bfloat16_and_non_contiguous_round_trip(group):
    half = dataclasses.replace(
        group,
        prefix_latents=group.prefix_latents.bfloat16(),
        pivot_inputs=group.pivot_inputs.bfloat16(),
        pivot_predictions=group.pivot_predictions.bfloat16(),
        pivot_latents=group.pivot_latents.bfloat16(),
        videos=group.videos.bfloat16(),
    )
    back = RolloutGroup.from_bytes(half.to_bytes())
    _assert_same(half, back)
    assert back.pivot_inputs.dtype == torch.bfloat16 and back.rewards.dtype == torch.float32

    strided = group.pivot_inputs.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    _assert_same(group, RolloutGroup.from_bytes(dataclasses.replace(group, pivot_inputs=strided).to_bytes()))


def test_shared_storage_and_empty_prefix_round_trip(group):
    # A single reward term: the total *is* the component tensor; safetensors alone would refuse to save it.
    single = dataclasses.replace(
        group, rewards=group.reward_components["vq"], reward_components={"vq": group.reward_components["vq"]}
    )
    _assert_same(single, RolloutGroup.from_bytes(single.to_bytes()))
    _, C, _, H, W = group.prefix_latents.shape
    first = dataclasses.replace(group, pivot=0, prefix_latents=torch.zeros(1, C, 0, H, W), videos=None)
    _assert_same(first, RolloutGroup.from_bytes(first.to_bytes()))


def test_nbytes_estimates_the_encoded_size(group):
    for g in (group, dataclasses.replace(group, videos=None)):
        size = len(g.to_bytes())
        assert size <= g.nbytes() <= size + 2048


# -- truncation, tampering, framing -----------------------------------------------------------------


def test_truncation_anywhere_is_refused(group):
    data = group.to_bytes()
    _, _, _, head_len = PREFIX.unpack_from(data)
    blob_at = PREFIX.size + head_len
    cuts = {
        "empty": 0,
        "inside magic": 4,
        "inside frame": 11,
        "inside header": PREFIX.size + head_len // 2,
        "inside blob length": blob_at + 3,
        "inside blob": (blob_at + len(data)) // 2,
        "digest dropped": len(data) - 32,
        "last byte dropped": len(data) - 1,
    }
    for where, cut in cuts.items():
        with pytest.raises(RecordError, match="truncated"):
            RolloutGroup.from_bytes(data[:cut])
            pytest.fail(where)
    with pytest.raises(RecordError, match="padded"):
        RolloutGroup.from_bytes(data + b"\x00")


def test_any_flipped_byte_is_refused(group):
    data = group.to_bytes()
    _, _, _, head_len = PREFIX.unpack_from(data)
    # Every byte of the frame and header, then a stride through the blob and the digest.
    frame_and_header = range(PREFIX.size + head_len + BLOB_LEN.size)
    positions = [*frame_and_header, *range(0, len(data), 97), *range(len(data) - 32, len(data))]
    for i in sorted(set(positions)):
        altered = bytearray(data)
        altered[i] ^= 0x01
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(bytes(altered))
    altered = bytearray(data)
    altered[(PREFIX.size + head_len + len(data)) // 2] ^= 0x80  # one bit in the middle of the tensor blob
    with pytest.raises(RecordError, match="digest"):
        RolloutGroup.from_bytes(bytes(altered))


def test_wrong_magic_and_future_version(group):
    data = group.to_bytes()
    with pytest.raises(RecordError, match="magic"):
        RolloutGroup.from_bytes(b"XX" + data[2:])
    with pytest.raises(RecordError, match="magic"):
        RolloutGroup.from_bytes(b"{}")
    with pytest.raises(RecordError, match="bytes"):
        RolloutGroup.from_bytes(data.decode("latin-1"))
    future = bytearray(data)
    future[7:9] = (SCHEMA_VERSION + 1).to_bytes(2, "little")
    expected = f"version {SCHEMA_VERSION + 1} \\(expected {SCHEMA_VERSION}\\)"
    with pytest.raises(RecordError, match=expected):
        RolloutGroup.from_bytes(bytes(future))
    # Even well-formed in every other way, with a correct digest.
    header, tensors = _split(data)
    with pytest.raises(RecordError, match=expected):
        RolloutGroup.from_bytes(
            _frame({**header, "schema_version": SCHEMA_VERSION + 1}, tensors, version=SCHEMA_VERSION + 1)
        )


# -- keys -------------------------------------------------------------------------------------------


def test_keyed_records_cannot_be_confused_or_forged(group):
    key = b"replay-buffer-secret"
    data = group.to_bytes(key=key)
    _assert_same(group, RolloutGroup.from_bytes(data, key=key))
    assert data[PREFIX.size :] != group.to_bytes()[PREFIX.size :]
    with pytest.raises(RecordError, match="digest"):
        RolloutGroup.from_bytes(data, key=b"another-secret")
    with pytest.raises(RecordError, match="written with an authentication key"):
        RolloutGroup.from_bytes(data)
    with pytest.raises(RecordError, match="no authentication key"):
        RolloutGroup.from_bytes(group.to_bytes(), key=key)

    # A forger without the key: an unkeyed record, or a keyed flag over an unkeyed digest.
    header, tensors = _split(data)
    forged = dict(header, policy_version=99)
    with pytest.raises(RecordError, match="no authentication key"):
        RolloutGroup.from_bytes(_frame(forged, tensors), key=key)
    with pytest.raises(RecordError, match="digest"):
        RolloutGroup.from_bytes(_frame(forged, tensors, keyed=True), key=key)
    # The helper is sound: with the key, the same edit is accepted.
    assert RolloutGroup.from_bytes(_frame(forged, tensors, key=key), key=key).policy_version == 99

    for bad in (b"", b"k" * 65, "secret"):
        with pytest.raises(ValueError, match="key"):
            group.to_bytes(key=bad)
        with pytest.raises(ValueError, match="key"):
            RolloutGroup.from_bytes(data, key=bad)


# -- validation, on build and on decode -------------------------------------------------------------


def test_non_finite_rewards_refused_on_build_encode_and_decode(group):
    bad = group.rewards.clone()
    bad[2] = float("nan")
    with pytest.raises(RecordError, match=r"rewards is not finite for branch\(es\) \[2\]"):
        dataclasses.replace(group, rewards=bad)
    comp = dict(group.reward_components, ta=torch.tensor([0.0, float("inf"), 0.0, float("-inf")]))
    with pytest.raises(RecordError, match=r"'ta' is not finite for branch\(es\) \[1, 3\]"):
        dataclasses.replace(group, reward_components=comp)
    mutated = dataclasses.replace(group)
    mutated.rewards = bad  # after construction: encoding checks again
    with pytest.raises(RecordError, match="not finite"):
        mutated.to_bytes()

    # By hand, with a correct digest: decoding re-validates.
    header, tensors = _split(group.to_bytes())
    _assert_same(group, RolloutGroup.from_bytes(_frame(header, tensors)))  # the hand-built frame is sound
    with pytest.raises(RecordError, match=r"rewards is not finite for branch\(es\) \[2\]"):
        RolloutGroup.from_bytes(_frame(header, {**tensors, "rewards": bad}))
    mq = tensors["reward/mq"].clone()
    mq[0] = float("inf")
    with pytest.raises(RecordError, match=r"'mq' is not finite for branch\(es\) \[0\]"):
        RolloutGroup.from_bytes(_frame(header, {**tensors, "reward/mq": mq}))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: dataclasses.replace(g, prefix_latents=g.prefix_latents[:, :, :1]), "prefix_latents"),
        (lambda g: dataclasses.replace(g, pivot=2), "prefix_latents .* for pivot 2"),
        (lambda g: dataclasses.replace(g, pivot_predictions=g.pivot_predictions[:, :-1]), "pivot_predictions"),
        (lambda g: dataclasses.replace(g, pivot_inputs=g.pivot_inputs[0]), "pivot_inputs"),
        (lambda g: dataclasses.replace(g, pivot_latents=g.pivot_latents[:3]), "pivot_latents"),
        (lambda g: dataclasses.replace(g, rewards=g.rewards[:3]), r"rewards must have shape \(4,\)"),
        (lambda g: dataclasses.replace(g, rewards=g.rewards.double()), "rewards must be a float32"),
        (lambda g: dataclasses.replace(g, reward_components={**g.reward_components, "ta": torch.zeros(5)}), "'ta'"),
        (lambda g: dataclasses.replace(g, videos=g.videos[:, :, :, :4]), "videos"),
        (lambda g: dataclasses.replace(g, videos=g.videos[:, :, :1]), "videos"),
        (
            lambda g: dataclasses.replace(
                g, pivot_inputs=g.pivot_inputs.long(), pivot_predictions=g.pivot_predictions.long()
            ),
            "pivot_inputs must be float32, bfloat16 or float16",
        ),
        (lambda g: dataclasses.replace(g, pivot=True), "pivot must be an int"),
        (lambda g: dataclasses.replace(g, prompt=None), "prompt must be a str"),
        (lambda g: dataclasses.replace(g, sigma=float("nan")), "sigma"),
        (lambda g: dataclasses.replace(g, extra={"a": [1]}), r"extra\['a'\]"),
        (lambda g: dataclasses.replace(g, extra={"a": float("inf")}), r"extra\['a'\]"),
    ],
)
def test_inconsistent_groups_refused(group, change, message):
    with pytest.raises(RecordError, match=message):
        change(group)


def _declare(header, tensors):
    return {**header, "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}}


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda h, t: (b"[1, 2]", t), "JSON object"),
        (lambda h, t: (b"\xff{not json", t), "not JSON"),
        (lambda h, t: (b"[" * 100_000 + b"]" * 100_000, t), "not JSON"),
        (lambda h, t: (h, b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!"), "safetensors"),
        (lambda h, t: ({k: v for k, v in h.items() if k != "prompt"}, t), r"misses field\(s\) \['prompt'\]"),
        (lambda h, t: ({**h, "schema_version": 0}, t), "header says schema version 0"),
        (lambda h, t: (h, {**t, "rewards": t["rewards"].double()}), r"do not match its header .*\['rewards'\]"),
        (lambda h, t: (h, {**t, "pivot_inputs": t["pivot_inputs"][:, :1].clone()}), "do not match its header"),
        (lambda h, t: (_declare(h, t2 := {**t, "rewards": t["rewards"].double()}), t2), "rewards must be a float32"),
        (lambda h, t: (_declare(h, t2 := {**t, "evil": torch.zeros(1)}), t2), r"unexpected \['evil'\]"),
        (
            lambda h, t: (_declare(h, t2 := {k: v for k, v in t.items() if k != "reward/mq"}), t2),
            r"missing \['reward/mq'\]",
        ),
        (lambda h, t: ({**h, "pivot": 1.0}, t), "pivot must be an int"),
        (lambda h, t: ({**h, "components": "vq"}, t), "components"),
        (lambda h, t: ({**h, "extra": [1]}, t), "extra must be a dict"),
    ],
)
def test_decoding_checks_the_contents_behind_a_valid_digest(group, tamper, message):
    header, tensors = _split(group.to_bytes())
    with pytest.raises(RecordError, match=message):
        RolloutGroup.from_bytes(_frame(*tamper(header, tensors)))


# -- never unpickled --------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_payload_is_refused_not_executed(tmp_path, group):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Exploit(control))).close()
    assert control.exists()  # the payload is live: unpickling it would create the file

    marker = tmp_path / "pwned"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps(_Exploit(marker), protocol=protocol)
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(payload)
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(MAGIC + payload)
        # Framed with a valid digest, as the header or as the tensor blob: parsed, never unpickled.
        header, tensors = _split(group.to_bytes())
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(_frame(payload, tensors))
        with pytest.raises(RecordError):
            RolloutGroup.from_bytes(_frame(header, payload))
    torch.save({"rewards": _Exploit(marker)}, tmp_path / "blob.pt")  # a torch checkpoint is a pickle too
    with pytest.raises(RecordError):
        RolloutGroup.from_bytes(_frame(header, (tmp_path / "blob.pt").read_bytes()))
    assert not marker.exists()
