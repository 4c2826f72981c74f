"""Rollout memory is bounded: the decoder works in sub-batches of rollout.decode_batch_size and hands
out uint8 frames [B, F, H, W, 3]; evaluation and sample videos generate run.eval_batch_size videos
at a time. Neither batch size changes what comes out."""

from __future__ import annotations

import torch

from common.config import load_config
from common.model.loading import decode_latents, load_vae
from common.model.policy import Policy, pixels_as_video
from common.toy.world import split_prompts
from common.video import to_uint8
from tests.conftest import tiny_config

PROMPTS = [p.text for p in split_prompts(seed=0)[0][:5]]


def test_the_vae_decodes_in_sub_batches_as_in_one(vae_dir):
    path, _ = vae_dir
    latents = torch.randn(5, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(load_vae(path), latents)
    for size in (1, 2, 5):
        policy = Policy.from_config(tiny_config(f"model.vae={path}", f"rollout.decode_batch_size={size}"))
        frames = policy.decode(latents)
        # uint8 [B, F, H, W, 3] on the CPU is what leaves the decoder (and goes to reward servers).
        assert frames.dtype == torch.uint8 and frames.device.type == "cpu" and frames.shape == (5, 9, 64, 64, 3)
        # The same videos in the same order. Not bit for bit: the CPU's convolution kernels change
        # with the batch size (1.5e-6 in [-1, 1] measured), which flips a handful of pixels by one
        # grey level when rounded (12 of 553k at sub-batches of 1).
        differ = (frames.int() - whole.int()).abs()
        assert differ.max() <= 1 and (differ > 0).float().mean() < 1e-4, size


def test_the_toy_decoder_gives_what_the_job_always_scored():
    latents = torch.randn(5, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.5  # some clamped
    frames = pixels_as_video(latents)
    assert frames.dtype == torch.uint8 and frames.shape == (5, 8, 16, 16, 3)
    assert torch.equal(frames, to_uint8(latents.clamp(-1, 1)))
    policy = Policy.from_config(
        load_config("configs/toy.yaml", ["model.diffusers_transformer=null", "rollout.decode_batch_size=2"])
    )
    assert torch.equal(policy.decode(latents), frames)


def _worker(*overrides: str):
    from actors.worker import RolloutWorker
    from rewards.server import build_reward_models, score_batch

    cfg = load_config("configs/toy.yaml", list(overrides))
    worker = RolloutWorker(cfg.model_dump(mode="json"), "rollout-0")
    models = build_reward_models(cfg)
    worker._scores = lambda server, frames, prompts: score_batch(models, frames, prompts)  # no Ray here
    return worker


def test_evaluation_does_not_depend_on_eval_batch_size():
    seeds = [10_000 + i for i in range(len(PROMPTS))]
    results = {}
    for size in (1, 2, 5):
        worker = _worker(f"run.eval_batch_size={size}")
        results[size] = (
            worker.evaluate(PROMPTS, seeds, "reference", 1.0, None),
            worker.sample_videos(PROMPTS[:3], [7] * 3, "reference"),
        )
    scores, videos = results[5]
    assert set(scores) == {"vq", "mq", "ta", "ood"} and all(len(v) == 5 for v in scores.values())
    assert len(videos) == 3
    for size in (1, 2):
        other, other_videos = results[size]
        # Each video depends only on its prompt and seed, but the CPU's matmul kernels change with the
        # batch size: up to 1e-5 in a pixel, which can flip a pixel by one grey level once rounded
        # and move the toy ood score by up to 5e-4 (measured; batches of 4, 8, 16 agreed exactly).
        # A video scored against another prompt or seed would be off by 1e-2 or more.
        for k, v in scores.items():
            torch.testing.assert_close(torch.tensor(other[k]), torch.tensor(v), atol=2e-3, rtol=0)
        assert len(other_videos) == 3
