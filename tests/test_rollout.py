"""One prompt's group on the committed toy generator: fork, decode, score, package."""

from __future__ import annotations

import pytest
import torch

from actors.rollout import collect_group, pixels_as_video
from common.config import load_config
from common.dataflow.records import RolloutGroup
from common.errors import RewardError
from common.model.loading import load_policy, load_text_encoder
from common.model.sampler import StreamingSampler
from common.video import from_uint8
from rewards.toy import score

PROMPT = "a green circle moving right on a gray background"
WEIGHTS = {"vq": 1.0, "mq": 1.0, "ta": 1.0}


@pytest.fixture(scope="module")
def toy():
    cfg = load_config("configs/toy.yaml", ["algorithm.group_size=4"])
    model = load_policy(cfg)
    return StreamingSampler.from_config(model, cfg), load_text_encoder(cfg)


def _collect(toy, reward_fn, **kw):
    sampler, encoder = toy
    return collect_group(
        sampler,
        encoder.encode([PROMPT]),
        PROMPT,
        pivot=1,
        group_size=4,
        sigma=0.5,
        plan_seed=3,
        fork_seed=4,
        decode=pixels_as_video,
        reward_fn=reward_fn,
        weights=WEIGHTS,
        policy_version=5,
        adapter="on_policy",
        **kw,
    )


def test_collect_group_scores_whole_videos(toy):
    # The decoder gives uint8 frames, as reward servers take them.
    group = _collect(toy, lambda v, p: score(from_uint8(v), p, ["vq", "mq", "ta", "ood"]))
    assert isinstance(group, RolloutGroup) and group.group_size == 4 and group.policy_version == 5
    c = group.reward_components
    assert torch.allclose(group.rewards, c["vq"] + c["mq"] + c["ta"])
    assert group.rewards.std() > 0  # neighbours differ: there is something to learn from
    assert group.pivot_latents.shape == (4, 3, 2, 16, 16)
    back = RolloutGroup.from_bytes(group.to_bytes())
    assert torch.equal(back.rewards, group.rewards)


def test_the_toy_generator_beats_noise(toy):
    sampler, encoder = toy
    videos = from_uint8(pixels_as_video(sampler.generate(encoder.encode([PROMPT] * 2), sampler.noise_plan(0, 1))))
    trained = score(videos, [PROMPT] * 2, ["ta"])["ta"].mean()
    noise = score(torch.rand_like(videos) * 2 - 1, [PROMPT] * 2, ["ta"])["ta"].mean()
    assert trained > noise + 0.1


def test_a_nan_reward_fails_the_group_loudly(toy):
    def broken(videos, prompts):
        out = score(from_uint8(videos), prompts, ["vq", "mq", "ta"])
        out["mq"][2] = float("nan")
        return out

    with pytest.raises(RewardError, match=r"'mq'.*\[2\]"):
        _collect(toy, broken)
    with pytest.raises(RewardError, match="missing"):
        _collect(toy, lambda v, p: score(from_uint8(v), p, ["vq"]))
