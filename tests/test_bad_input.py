"""Bad input of every kind is refused with the project's own error, never a traceback wall:
property-based over the config schema and the record decoder, plus prompt files."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.prompts import MAX_PROMPT_CHARS, PromptError, read_prompt_file
from common.config import Config, ConfigError, load_config
from common.dataflow.records import RecordError, RolloutGroup

SECTIONS = list(Config.model_fields)
KEYS = {name: list(Config.model_fields[name].annotation.model_fields) for name in SECTIONS}
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "null",
            "true",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "'x'",
            "-1",
            "0",
            "1e-9",
            "[[",
            "a: b: c",
            "uniform",
            "fifo",
            "pixels",
            "cpu",
            "float16",
            "''",
        ]
    ),
    st.text(max_size=12),
)


@st.composite
def override(draw) -> str:
    section = draw(st.sampled_from(SECTIONS + ["nonsense"]))
    key = draw(st.sampled_from(KEYS.get(section, []) + ["not_a_key"]))
    path = (
        f"{section}.{key}" if draw(st.booleans()) else draw(st.sampled_from([section, f"{section}.{key}.deeper", key]))
    )
    return f"{path}={draw(VALUES)}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(override(), max_size=4))
def test_any_overrides_load_or_fail_with_config_error(overrides):
    try:
        cfg = load_config("configs/toy.yaml", overrides)
    except ConfigError as exc:
        assert str(exc)  # the message names something; never an empty error
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_file_loads_or_fails_with_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def record_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    group = RolloutGroup(
        prompt="p",
        pivot=1,
        sigma=0.5,
        plan_seed=1,
        fork_seed=2,
        policy_version=3,
        prefix_latents=torch.randn(1, 3, 2, 4, 4, generator=g),
        pivot_inputs=torch.randn(4, 2, 3, 2, 4, 4, generator=g),
        pivot_predictions=torch.randn(4, 2, 3, 2, 4, 4, generator=g),
        pivot_latents=torch.randn(4, 3, 2, 4, 4, generator=g),
        rewards=torch.rand(4, generator=g),
        reward_components={"vq": torch.rand(4, generator=g)},
    )
    return group.to_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_records_decode_exactly_or_are_refused(record_bytes, data):
    raw = bytearray(record_bytes)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[:at]
    elif kind == "insert":
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        raw[at : at + 8] = data.draw(st.binary(min_size=0, max_size=8))
    try:
        decoded = RolloutGroup.from_bytes(bytes(raw))
    except RecordError:
        return
    assert decoded.to_bytes() == record_bytes  # only a no-op mutation may decode


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(blob):
    with pytest.raises(RecordError):
        RolloutGroup.from_bytes(blob)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no prompts"),
        (b"# only a comment\n\n   \n", "no prompts"),
        (b"a fine prompt\n\xff\xfe broken\n", ":2: not UTF-8"),
        (b"ok\n" + b"x" * (MAX_PROMPT_CHARS + 1) + b"\n", f":2: prompt of {MAX_PROMPT_CHARS + 1} characters"),
    ],
)
def test_bad_prompt_files_are_refused_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(PromptError, match=message):
        read_prompt_file(path)
    with pytest.raises(PromptError, match="no file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_a_good_prompt_file_keeps_order_and_skips_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\nfirst prompt\n\n  second prompt  \n", encoding="utf-8")
    assert read_prompt_file(path) == ["first prompt", "second prompt"]


def test_more_gpus_than_the_cluster_has_is_refused_before_any_actor_starts():
    from cluster.placement import PlacementError, check_resources

    cfg = load_config("configs/toy.yaml", ["rollout.num_workers=4", "rollout.num_gpus_per_worker=1"])
    with pytest.raises(PlacementError, match=r"need 4 GPU .*rollout 4 x 1.* but the cluster has 2"):
        check_resources(cfg, {"CPU": 64.0, "GPU": 2.0})
    check_resources(load_config("configs/toy.yaml"), {"CPU": 2.0})  # the toy default fits a 2-core laptop


def test_custom_role_resources_the_cluster_lacks_are_refused():
    from cluster.placement import PlacementError, check_resources

    cfg = load_config("configs/toy.yaml", ["rollout.num_workers=2", "rollout.resources={rollout_gpu: 1}"])
    with pytest.raises(PlacementError, match="need 2 of the custom resource 'rollout_gpu'.*has 1"):
        check_resources(cfg, {"CPU": 8.0, "rollout_gpu": 1.0})
    check_resources(cfg, {"CPU": 8.0, "rollout_gpu": 2.0})
