"""The toy world: prompts, renders, the toy text encoder, and rewards that rank what they claim to."""

from __future__ import annotations

import pytest
import torch

from common.toy.world import (
    ToyPrompt,
    ToyTextEncoder,
    all_prompts,
    chunk_velocities,
    render,
    render_batch,
    split_prompts,
)
from common.video import to_uint8
from rewards.toy import TOY_REWARDS, score

PROMPTS = [p.text for p in all_prompts()[::5]]


@pytest.fixture(scope="module")
def clean():
    return render_batch(PROMPTS, seeds=range(len(PROMPTS)))


def test_prompts_round_trip_and_split():
    prompts = all_prompts()
    assert len(prompts) == 5 * 3 * 4 * 3
    assert all(ToyPrompt.parse(p.text) == p for p in prompts)
    train, held = split_prompts(seed=0)
    assert len(held) == 36 and not set(train) & set(held) and len(train) + len(held) == len(prompts)
    with pytest.raises(ValueError, match="'purple'"):
        ToyPrompt.parse("a purple circle moving left on a black background")
    with pytest.raises(ValueError, match="not a toy prompt"):
        ToyPrompt.parse("a cat")


def test_render_moves_in_the_stated_direction():
    for direction, (axis, sign) in {"left": (3, -1), "right": (3, 1), "up": (2, -1), "down": (2, 1)}.items():
        video = render(f"a red circle moving {direction} on a black background", seed=3)
        assert video.shape == (3, 8, 16, 16) and video.min() >= -1 and video.max() <= 1
        redness = (video[0] - video[1]).clamp_min(0)  # [F, H, W]
        coords = torch.arange(16, dtype=torch.float32)
        profile = redness.sum(1) if axis == 3 else redness.sum(2)  # mass along the moving axis
        centre = (profile * coords).sum(-1) / profile.sum(-1)
        assert sign * (centre[-1] - centre[0]) > 5
    assert torch.equal(render(PROMPTS[0], seed=1), render(PROMPTS[0], seed=1))
    assert not torch.equal(render(PROMPTS[0], seed=1), render(PROMPTS[0], seed=2))
    assert to_uint8(render(PROMPTS[0])[None]).shape == (1, 8, 16, 16, 3)


def _centroids(video: torch.Tensor) -> torch.Tensor:
    """[F, 2] centroid (x, y) of a red object on black."""
    redness = (video[0] - video[1]).clamp_min(0)  # [F, H, W]
    coords = torch.arange(16, dtype=torch.float32) + 0.5
    mass = redness.sum((1, 2))
    return torch.stack([(redness.sum(1) * coords).sum(-1) / mass, (redness.sum(2) * coords).sum(-1) / mass], 1)


def test_later_chunks_keep_or_change_their_velocity():
    # Real videos' later chunks are not determined by the earlier ones; the toy world's are not either:
    # at each chunk boundary the velocity is kept or re-drawn, so a chunk's noise has a choice to make.
    import random

    prompt = ToyPrompt.parse("a red circle moving right on a black background")
    kept = changed = 0
    for seed in range(200):
        v = chunk_velocities(prompt, 4, 1.0, random.Random(seed))
        assert all(0.7 - 1e-6 <= vx <= 1.3 + 1e-6 and abs(vy) <= 0.3 + 1e-6 for vx, vy in v)
        kept += sum(a == b for a, b in zip(v, v[1:], strict=False))
        changed += sum(a != b for a, b in zip(v, v[1:], strict=False))
    assert 200 < kept < 400 and 200 < changed < 400  # keep probability 0.5 over 600 boundaries
    # The rendered path follows them: frame 1 moves by chunk 0's velocity, frames 2-3 by chunk 1's, ...
    for seed in range(5):
        video = render(prompt.text, seed=seed)
        steps = _centroids(video).diff(dim=0)  # [7, 2]
        v = torch.tensor(chunk_velocities(prompt, 4, 1.0, random.Random(seed)))
        assert torch.allclose(steps, v[torch.tensor([0, 1, 1, 2, 2, 3, 3])], atol=0.05), seed
        assert video.shape == (3, 8, 16, 16) and (_centroids(video) > 2.9).all() and (_centroids(video) < 13.1).all()
    # variation 0: the old constant-speed world; keep probability 1: one velocity per clip.
    steps = _centroids(render(prompt.text, seed=7, variation=0.0)).diff(dim=0)
    assert torch.allclose(steps, torch.tensor([1.0, 0.0]).expand(7, 2), atol=0.05)
    steps = _centroids(render(prompt.text, seed=7, keep_probability=1.0)).diff(dim=0)
    assert torch.allclose(steps, steps[:1].expand(7, 2), atol=0.05)


def test_motion_quality_prefers_kept_velocities():
    # What RL can push toward at every pivot: the continuation that keeps the motion smooth.
    prompts = [p.text for p in all_prompts()[::3]]
    seeds = range(len(prompts))
    mq = TOY_REWARDS["mq"]
    smooth = mq(render_batch(prompts, seeds=seeds, keep_probability=1.0), prompts)
    data = mq(render_batch(prompts, seeds=seeds), prompts)
    rough = mq(render_batch(prompts, seeds=seeds, keep_probability=0.0), prompts)
    assert smooth.mean() > data.mean() + 0.1 > rough.mean() + 0.2, (smooth.mean(), data.mean(), rough.mean())
    assert smooth.min() > 0.9


def test_toy_text_encoder():
    enc = ToyTextEncoder(dim=16)
    a = enc.encode(PROMPTS[:3])
    assert a.shape == (3, 4, 16)
    assert torch.equal(a, ToyTextEncoder(dim=16).encode(PROMPTS[:3]))
    assert not torch.equal(a[0], a[1])


def _degrade(clean):
    gen = torch.Generator().manual_seed(0)
    flicker = clean.clone()
    flicker[:, :, ::2] = -0.9
    return {
        "noise": clean + 0.3 * torch.randn(clean.shape, generator=gen),
        "blur": torch.nn.functional.avg_pool3d(clean, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False),
        "shuffled": clean[:, :, torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])],
        "flicker": flicker,
    }


def _swap(prompt: str, **change) -> str:
    p = ToyPrompt.parse(prompt)
    return ToyPrompt(**{**p.__dict__, **change}).text


@pytest.mark.parametrize(
    "reward, degradations",
    [
        ("vq", ["noise", "blur"]),
        ("mq", ["shuffled", "flicker"]),
        ("ta", ["noise", "blur", "flicker"]),
        ("ood", ["noise", "flicker"]),
    ],
)
def test_rewards_rank_clean_above_degraded(clean, reward, degradations):
    base = TOY_REWARDS[reward](clean, PROMPTS).mean()
    for name in degradations:
        assert TOY_REWARDS[reward](_degrade(clean)[name], PROMPTS).mean() < base - 0.05, name


def test_text_alignment_ranks_the_right_prompt_first(clean):
    ta = TOY_REWARDS["ta"]
    wrong_colour = [_swap(p, colour="green" if "red" in p else "red") for p in PROMPTS]
    flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong_direction = [_swap(p, direction=flip[ToyPrompt.parse(p).direction]) for p in PROMPTS]
    # The same clean videos judged against prompts they do not match.
    assert (ta(clean, PROMPTS) > ta(clean, wrong_colour)).float().mean() > 0.9
    assert (ta(clean, PROMPTS) > ta(clean, wrong_direction)).float().mean() > 0.9


def test_rewards_are_finite_on_garbage_and_reject_bad_input(clean):
    gen = torch.Generator().manual_seed(1)
    for video in (torch.rand(clean.shape, generator=gen) * 2 - 1, torch.zeros_like(clean), torch.full_like(clean, 5.0)):
        for name, value in score(video, PROMPTS, list(TOY_REWARDS)).items():
            assert value.shape == (len(PROMPTS),) and torch.isfinite(value).all(), name
    with pytest.raises(ValueError, match="videos"):
        score(clean[:, :2], PROMPTS, ["vq"])
    with pytest.raises(ValueError, match="prompts"):
        score(clean, PROMPTS[:-1], ["vq"])
    with pytest.raises(ValueError, match="dtype"):
        score(clean.to(torch.uint8), PROMPTS, ["vq"])
    with pytest.raises(ValueError, match="unknown toy reward"):
        score(clean, PROMPTS, ["hps"])


def test_rewards_separate_fork_neighbours(clean):
    # Small perturbations must move the score: GRPO learns from differences inside a group.
    gen = torch.Generator().manual_seed(2)
    nudged = clean + 0.05 * torch.randn(clean.shape, generator=gen)
    for name, fn in TOY_REWARDS.items():
        assert (fn(nudged, PROMPTS) - fn(clean, PROMPTS)).abs().max() > 1e-4, name
