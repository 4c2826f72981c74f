"""CLIP score and PickScore on sampled frames: tiny CLIPModels with random weights, saved as Hugging
Face directories with their processors, loaded through the project's registry."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.errors import RewardError
from rewards.base import PromptTruncated
from rewards.clip import ClipReward
from rewards.registry import build_models
from rewards.tiny import make_tiny_clip

PROMPTS = ["a red circle moving left", "a green square moving up"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def videos(b=2, f=9, seed=0):
    return torch.randint(0, 256, (b, f, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_clip_and_pickscore_load_from_the_config_and_average_over_frames(clip_dir):
    cfg = load_config(
        "configs/toy.yaml",
        [
            f"rewards.models=[{{kind: clip, path: {clip_dir}, num_frames: 3}}, "
            f"{{kind: pickscore, path: {clip_dir}, processor: {clip_dir}, num_frames: 3}}]",
            "rewards.terms=[{name: clip_score}, {name: pickscore, weight: 0.5}]",
            "run.phases=[on_policy]",
            "run.out_of_domain=null",
        ],
    )
    clip, pick = build_models(cfg)
    assert clip.components == ["clip_score"] and pick.components == ["pickscore"]
    v = videos()
    out = {**clip(v, PROMPTS), **pick(v, PROMPTS)}
    for k in ("clip_score", "pickscore"):
        assert out[k].shape == (2,) and torch.isfinite(out[k]).all()
    assert (out["clip_score"] >= 0).all() and (out["clip_score"] <= 100).all()
    # Frames 0, 4, 8 are the ones sampled; the score is their mean.
    per_frame = [pick(v[:, i : i + 1], PROMPTS)["pickscore"] for i in (0, 4, 8)]
    torch.testing.assert_close(out["pickscore"], torch.stack(per_frame).mean(0), atol=1e-4, rtol=1e-4)


def test_image_embedding_is_the_pooler_output_in_transformers_5(clip_dir):
    m = ClipReward(clip_dir)
    pixels = torch.zeros(1, 3, 32, 32)
    out = m.model.get_image_features(pixel_values=pixels)
    assert not isinstance(out, torch.Tensor) and out.pooler_output.shape == (1, 16)


def test_long_prompt_is_truncated_with_a_warning(clip_dir):
    m = ClipReward(clip_dir, kind="pickscore")
    with pytest.warns(PromptTruncated, match="limit of 77"):
        out = m(videos(1), [" ".join(["red circle moving left"] * 40)])
    assert torch.isfinite(out["pickscore"]).all()


def test_missing_weights_and_bad_inputs_are_named(clip_dir, tmp_path):
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(RewardError, match="no weights"):
        ClipReward(tmp_path)
    with pytest.raises(RewardError, match="config.json missing"):
        ClipReward(tmp_path / "none")
    m = ClipReward(clip_dir)
    with pytest.raises(RewardError, match="uint8"):
        m(videos().float(), PROMPTS)
    with pytest.raises(RewardError, match="empty"):
        m(videos()[:, :0], PROMPTS)
