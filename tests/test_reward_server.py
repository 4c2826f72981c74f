"""The reward server's batching and failure isolation, driven through its real async entry point."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.config import load_config
from common.errors import RewardError
from common.toy.world import render_batch
from common.video import to_uint8
from rewards.server import RewardServer, check_videos

PROMPTS = [
    "a red circle moving left on a black background",
    "a green square moving up on a gray background",
    "a blue cross moving down on a brown background",
]


class PoisonedModel:
    """A reward model that returns NaN for one prompt, as a broken real model might."""

    components = ["bad"]

    def __call__(self, frames, prompts):
        return {"bad": torch.tensor([float("nan") if "green" in p else 1.0 for p in prompts])}


def server(**overrides) -> RewardServer:
    cfg = load_config("configs/toy.yaml", [f"{k}={v}" for k, v in overrides.items()])
    return RewardServer(cfg.model_dump(mode="json"))


def videos(prompts, seed=0):
    return to_uint8(render_batch(prompts, seeds=[seed + i for i in range(len(prompts))]))


def test_concurrent_requests_are_batched_and_answered_with_their_own_scores():
    s = server(**{"rewards.batch_timeout_s": 0.2})

    async def main():
        return await asyncio.gather(*[s.score(videos([p]), [p]) for p in PROMPTS])

    answers = asyncio.run(main())
    alone = [server().models[0](videos([p]), [p]) for p in PROMPTS]
    for got, want in zip(answers, alone, strict=True):
        assert set(got) == {"vq", "mq", "ta", "ood"}
        for k in want:
            torch.testing.assert_close(got[k], want[k].float())
    assert s.stats["batches"] == 1 and s.stats["requests"] == 3 and s.stats["videos"] == 3


def test_a_non_finite_score_fails_only_its_own_request():
    s = server(**{"rewards.batch_timeout_s": 0.2})
    s.models.append(PoisonedModel())

    async def main():
        return await asyncio.gather(*[s.score(videos([p]), [p]) for p in PROMPTS], return_exceptions=True)

    red, green, blue = asyncio.run(main())
    assert isinstance(green, RewardError) and "'bad' is not finite" in str(green)
    assert torch.isfinite(red["bad"]).all() and torch.isfinite(blue["ta"]).all()
    assert s.stats["failures"] == 1


@pytest.mark.parametrize(
    "frames, prompts, message",
    [
        (torch.zeros(0, 8, 16, 16, 3, dtype=torch.uint8), [], "empty"),
        (torch.zeros(1, 8, 16, 16, 3), ["x"], "uint8"),
        (torch.zeros(1, 16, 16, 3, dtype=torch.uint8), ["x"], "uint8 [B, F, H, W, 3]"),
        (torch.zeros(2, 8, 16, 16, 3, dtype=torch.uint8), ["x"], "2 videos but 1 prompts"),
    ],
)
def test_bad_videos_are_refused_by_name(frames, prompts, message):
    with pytest.raises(RewardError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_videos(frames, prompts)
