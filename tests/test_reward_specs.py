"""`rewards.models` entries are a union tagged by `kind` (common/config.py): each kind takes its own
fields and no other kind's, and every refusal names rewards.models[i].<field>."""

from __future__ import annotations

import pytest

from common.config import (
    ClipRewardSpec,
    ConfigError,
    PickScoreRewardSpec,
    ToyRewardSpec,
    VideoAlignRewardSpec,
    load_config,
    reward_model_specs,
)

TOY = "configs/toy.yaml"


def _models(entries: str) -> list[dict]:
    return load_config(TOY, ["rewards.num_gpus_per_server=1", f"rewards.models={entries}"]).rewards.models


def test_each_kind_is_its_own_model():
    cfg = load_config(
        TOY,
        [
            "rewards.models=[{kind: toy, components: [vq]}, {kind: videoalign, path: /v, fps: 4},"
            " {kind: clip, path: /c, num_frames: 2}, {kind: pickscore, path: /p, processor: /q}]"
        ],
    )
    specs = reward_model_specs(cfg)
    assert [type(s) for s in specs] == [ToyRewardSpec, VideoAlignRewardSpec, ClipRewardSpec, PickScoreRewardSpec]
    assert specs[0].components == ["vq"] and specs[1].fps == 4 and specs[2].num_frames == 2
    assert str(specs[3].processor) == "/q"
    assert not hasattr(specs[0], "path") and not hasattr(specs[2], "fps") and not hasattr(specs[1], "num_frames")
    # Normalised entries stay the plain dicts the config carries (JSON, through Ray and config.yaml).
    assert cfg.rewards.models[1] == {"kind": "videoalign", "path": "/v", "fps": 4}


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            "[{kind: toy, path: /x}]",
            "rewards.models[0].path: kind toy takes no `path` (a field of videoalign, clip, pickscore)",
        ),
        ("[{kind: clip, path: /x, fps: 3}]", "rewards.models[0].fps: kind clip takes no `fps` (a field of videoalign)"),
        (
            "[{kind: toy}, {kind: clip, path: /x, components: [vq]}]",
            "rewards.models[1].components: kind clip takes no `components` (a field of toy)",
        ),
        ("[{kind: clip, path: /x, bogus: 1}]", "rewards.models[0].bogus: Extra inputs are not permitted"),
        (
            "[{kind: hpsv9, path: /x}]",
            "rewards.models[0].kind: Input should be 'toy', 'videoalign', 'clip' or 'pickscore'",
        ),
        ("[{path: /x}]", "rewards.models[0].kind: Field required"),
        (
            "[{kind: videoalign}]",
            "rewards.models[0]: a videoalign reward model needs `path` (a local checkpoint directory)",
        ),
        (
            "[{kind: videoalign, path: /x, max_pixels: 10}]",
            "rewards.models[0].max_pixels: Input should be greater than or equal to 784",
        ),
        (
            "[{kind: pickscore, path: /x, dtype: float64}]",
            "rewards.models[0].dtype: Input should be 'float32', 'bfloat16' or 'float16'",
        ),
    ],
)
def test_refusals_name_the_entry_and_field(entries, message):
    with pytest.raises(ConfigError) as err:
        _models(entries)
    assert message in str(err.value)
