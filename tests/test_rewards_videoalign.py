"""VideoAlign (VideoReward) on a tiny Qwen2-VL of the real architecture, random weights, saved in the
released layout (base Qwen2-VL dir + model_config.json + checkpoint-<step>/model.pth, legacy keys)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from common.errors import RewardError
from rewards.base import PromptTruncated, fps_frame_indices
from rewards.tiny import make_tiny_videoalign
from rewards.videoalign import PUBLISHED_NORM, VideoAlignReward, patchify, translate_keys

PROMPTS = ["a red circle moving left on a black background", "a green square moving up"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_videoalign(tmp_path_factory.mktemp("videoalign"))


@pytest.fixture(scope="module")
def model(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoAlignReward(ckpt)


def clip(frames=17, h=56, w=84, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, h, w, 3), dtype=torch.uint8, generator=g)


def test_81_frame_16fps_clip_is_sampled_at_2fps_within_448x448(model):
    idx = fps_frame_indices(81, 16.0, 2.0)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 80 and idx == sorted(idx)
    x = model.sample_frames(torch.zeros(81, 480, 832, 3, dtype=torch.uint8), fps=16.0)
    assert tuple(x.shape) == (10, 3, 336, 588) and 336 * 588 <= 448 * 448
    _, grid = patchify(x)
    assert grid == [5, 24, 42]  # 1260 video tokens after the 2x2 merge
    assert model.frame_shape(81, 480, 832, 16.0) == (10, 336, 588)


def test_patches_match_the_qwen2vl_image_processor():
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    img = clip(1, 56, 84)[0]
    want = Qwen2VLImageProcessorPil()(images=[img.numpy()], return_tensors="pt", do_resize=False)
    got, grid = patchify(torch.stack([img, img]).permute(0, 3, 1, 2).float())
    assert grid == want["image_grid_thw"][0].tolist()
    torch.testing.assert_close(got, want["pixel_values"], atol=1e-5, rtol=0)


def test_scores_are_finite_declared_and_normalised_as_published(model, ckpt):
    videos = torch.stack([clip(seed=1), clip(seed=2)])
    out = model(videos, PROMPTS, fps=16.0)
    assert set(out) == set(model.components) == {"vq", "mq", "ta", "overall", "vq_raw", "mq_raw", "ta_raw"}
    for k, v in out.items():
        assert v.shape == (2,) and torch.isfinite(v).all(), k
    for d, (mean, std) in PUBLISHED_NORM.items():
        torch.testing.assert_close(out[d], (out[d + "_raw"] - mean) / std)
    assert PUBLISHED_NORM == {"vq": (3.6757, 2.2476), "mq": (1.1646, 1.3811), "ta": (2.8105, 2.5121)}
    torch.testing.assert_close(out["overall"], out["vq"] + out["mq"] + out["ta"])
    # Batching (right padding, different prompt lengths) gives each video its own score.
    alone = model(videos[1:], PROMPTS[1:], fps=16.0)
    torch.testing.assert_close(alone["vq_raw"], out["vq_raw"][1:], atol=1e-4, rtol=1e-4)
    raw = VideoAlignReward(ckpt, normalize=False)(videos, PROMPTS, fps=16.0)
    torch.testing.assert_close(raw["vq"], out["vq_raw"])


def test_legacy_keys_translate_to_transformers_5():
    state = translate_keys(
        {
            "visual.blocks.0.x": 1,
            "model.layers.0.y": 2,
            "lm_head.weight": 3,
            "rm_head.weight": 4,
            "base_model.model.model.norm.weight": 5,
            "model.visual.z": 6,
        }
    )
    assert set(state) == {
        "model.visual.blocks.0.x",
        "model.language_model.layers.0.y",
        "lm_head.weight",
        "rm_head.weight",
        "model.language_model.norm.weight",
        "model.visual.z",
    }


def test_lora_checkpoint_is_merged_into_the_base_weights(tmp_path):
    root = make_tiny_videoalign(tmp_path / "lora", lora=True, output_dim=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = VideoAlignReward(root)
    expected = translate_keys(torch.load(root / "expected_state.pth"))
    state = m.model.state_dict()
    for k, v in expected.items():
        if k.startswith("model."):
            torch.testing.assert_close(state[k[len("model.") :]], v, msg=k)
    torch.testing.assert_close(m.head.weight, expected["rm_head.weight"])
    out = m(clip()[None], PROMPTS[:1], fps=8.0)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_missing_files_are_named(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "checkpoint-11352" / "model.pth").unlink()
    with pytest.raises(RewardError, match="model.pth or adapter_model.safetensors not found"):
        VideoAlignReward(broken)
    (broken / "model_config.json").unlink()
    with pytest.raises(RewardError, match="model_config.json not found"):
        VideoAlignReward(broken)
    with pytest.raises(RewardError, match="base Qwen2-VL directory not found"):
        VideoAlignReward(ckpt, base_model=tmp_path / "nowhere")
    with pytest.raises(RewardError, match="no checkpoint directory"):
        VideoAlignReward(tmp_path / "nothing")


def test_long_prompt_is_truncated_with_a_warning(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = VideoAlignReward(ckpt, max_prompt_tokens=8)
    with pytest.warns(PromptTruncated, match="truncated to the model's limit of 8"):
        out = m(clip()[None], [" ".join(["a red circle moving left"] * 20)], fps=16.0)
    assert torch.isfinite(out["overall"]).all()


@pytest.mark.parametrize(
    "frames, prompts, message",
    [
        (torch.zeros(1, 0, 56, 56, 3, dtype=torch.uint8), ["x"], "empty"),
        (torch.zeros(1, 4, 56, 56, 3), ["x"], "uint8"),
        (torch.zeros(4, 56, 56, 3, dtype=torch.uint8), ["x"], "uint8"),
        (torch.zeros(2, 4, 56, 56, 3, dtype=torch.uint8), ["x"], "2 videos but 1 prompts"),
    ],
)
def test_bad_inputs_raise_reward_errors(model, frames, prompts, message):
    with pytest.raises(RewardError, match=message):
        model(frames, prompts, fps=16.0)


def test_a_one_frame_clip_still_scores(model):
    out = model(clip(1)[None], ["x"], fps=16.0)
    assert torch.isfinite(out["overall"]).all()
