"""Toy-world rewards that play the roles of VideoAlign's VQ, MQ and TA, plus a held-out OOD score.

All take videos [B, 3, F, H, W] in [-1, 1] and their prompts and return float32 [B], roughly in
[0, 1], higher is better. Every measure is soft (no thresholds), so neighbouring videos of a fork
get different scores: GRPO needs that signal.

They share one reading of a frame, relative to the prompt's two colours: each pixel p is projected
on the segment from the background colour b to the object colour o, giving a coverage
alpha = clamp(<p - b, o - b> / |o - b|^2, 0, 1) (the object mask) and an off-palette residual
|p - (b + alpha (o - b))|.
"""

from __future__ import annotations

import functools

import torch

from common.toy.world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ToyPrompt, object_alpha

# MQ: a mean squared centroid acceleration of JERK_SCALE px^2/frame^4 costs a factor e. 0.1, not 0.5,
# so one velocity change at a chunk boundary (the toy world's data has them) is clearly rougher
# than a kept velocity; jitter and shuffled frames still cost far more.
JERK_SCALE = 0.1


def _check(videos: torch.Tensor, prompts: list[str]) -> None:
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[1] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a tensor [B, 3, F, H, W], got {shape}")
    if not videos.is_floating_point():
        raise ValueError(f"videos must be float in [-1, 1], got dtype {videos.dtype}")
    if videos.shape[2] < 2:
        raise ValueError("videos need at least 2 frames")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {videos.shape[0]} videos")


def _palette(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = [ToyPrompt.parse(p) for p in prompts]
    obj = torch.tensor([COLOURS[p.colour] for p in parsed])
    bg = torch.tensor([BACKGROUNDS[p.background] for p in parsed])
    return obj, bg


def _decompose(videos: torch.Tensor, prompts: list[str]):
    """(alpha [B, F, H, W], residual [B, F, H, W]) relative to each prompt's palette."""
    pixels = (videos.float().clamp(-1, 1) + 1) / 2  # [B, 3, F, H, W] in [0, 1]
    obj, bg = _palette(prompts)
    axis = (obj - bg)[:, :, None, None, None]
    rel = pixels - bg[:, :, None, None, None]
    alpha = ((rel * axis).sum(1) / axis.square().sum(1)).clamp(0, 1)
    residual = (rel - alpha[:, None] * axis).norm(dim=1)
    return alpha, residual


def _moments(alpha: torch.Tensor):
    """Per frame: area, centroid (x, y) of the coverage mask."""
    _, _, h, w = alpha.shape
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    area = alpha.sum((2, 3))
    denom = area.clamp_min(1e-3)
    cx = (alpha * xs).sum((2, 3)) / denom
    cy = (alpha * ys).sum((2, 3)) / denom
    return area, cx, cy


def visual_quality(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """VQ analogue: clean, sharp frames. Off-palette colour (noise, colour casts) and half-covered
    pixels beyond anti-aliased edges (blur, smears) lower it. 1 = a clean render."""
    _check(videos, prompts)
    alpha, residual = _decompose(videos, prompts)
    cleanliness = torch.exp(-residual.square().mean((1, 2, 3)) / 0.01)
    mushiness = (4 * alpha * (1 - alpha)).mean((1, 2, 3))  # 0 for crisp two-colour frames
    sharpness = torch.exp(-mushiness / 0.15)
    return (0.5 * cleanliness + 0.5 * sharpness).float()


def motion_quality(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """MQ analogue: one object present throughout, moving at a steady velocity with a steady size.
    Acceleration of the centroid (jitter, shuffled frames, and the velocity changes at chunk boundaries
    that the toy world's data contains) and area changes (flicker) lower it: of the continuations the
    data allows, the one that keeps the velocity scores highest."""
    _check(videos, prompts)
    alpha, _ = _decompose(videos, prompts)
    area, cx, cy = _moments(alpha)
    presence = 1 - torch.exp(-area.mean(1) / 8.0)
    vx, vy = cx.diff(dim=1), cy.diff(dim=1)
    jerk = (
        (vx.diff(dim=1).square() + vy.diff(dim=1).square()).mean(1) if vx.shape[1] > 1 else torch.zeros_like(presence)
    )
    steady_motion = torch.exp(-jerk / JERK_SCALE)
    flicker = (area.std(1, unbiased=False) / area.mean(1).clamp_min(1e-3)).square()
    steady_size = torch.exp(-flicker / 0.05)
    return (presence * steady_motion * steady_size).float()


@functools.cache
def _shape_signature(shape: str) -> float:
    """Expected 4-fold anisotropy of a clean render of `shape` (see `_anisotropy`)."""
    centre = torch.tensor([8.0])
    alpha = object_alpha(shape, centre, centre, 16)[None]
    return _anisotropy(alpha)[0, 0].item()


def _anisotropy(alpha: torch.Tensor) -> torch.Tensor:
    """sum a (dx^4 + dy^4) / sum a (dx^2 + dy^2)^2 about the centroid, per frame: about 0.64 for a
    square, 0.75 for a circle, near 1 for a cross. Scale-free, so it measures shape, not size."""
    _, cx, cy = _moments(alpha)
    _, _, h, w = alpha.shape
    dx = torch.arange(w, dtype=torch.float32)[None, None, None, :] + 0.5 - cx[..., None, None]
    dy = torch.arange(h, dtype=torch.float32)[None, None, :, None] + 0.5 - cy[..., None, None]
    num = (alpha * (dx**4 + dy**4)).sum((2, 3))
    den = (alpha * (dx**2 + dy**2).square()).sum((2, 3)).clamp_min(1e-6)
    return num / den


def text_alignment(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """TA analogue: the mean of four prompt matches computed from the frames: object colour,
    background colour, displacement along the stated direction, and shape."""
    _check(videos, prompts)
    pixels = (videos.float().clamp(-1, 1) + 1) / 2
    obj, bg = _palette(prompts)
    parsed = [ToyPrompt.parse(p) for p in prompts]
    # Colours: soft split of pixels into "background-like" and the rest.
    far = 1 - torch.exp(-(pixels - bg[:, :, None, None, None]).square().sum(1) / 0.05)  # [B, F, H, W]
    obj_est = (pixels * far[:, None]).sum((2, 3, 4)) / far.sum((1, 2, 3)).clamp_min(1e-3)[:, None]
    bg_est = (pixels * (1 - far[:, None])).sum((2, 3, 4)) / (1 - far).sum((1, 2, 3)).clamp_min(1e-3)[:, None]
    colour = torch.exp(-(obj_est - obj).square().sum(1) / 0.1)
    background = torch.exp(-(bg_est - bg).square().sum(1) / 0.05)
    # Direction: centroid displacement first -> last frame, projected on the stated direction.
    alpha, _ = _decompose(videos, prompts)
    _, cx, cy = _moments(alpha)
    u = torch.tensor([DIRECTIONS[p.direction] for p in parsed])
    dx, dy = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
    along = dx * u[:, 0] + dy * u[:, 1]
    across = dx * u[:, 1] - dy * u[:, 0]
    direction = torch.sigmoid(along / 1.5) * torch.exp(-across.square() / 16.0)
    # Shape: anisotropy against the clean shape's.
    expected = torch.tensor([_shape_signature(p.shape) for p in parsed])
    shape = torch.exp(-(_anisotropy(alpha).mean(1) - expected).square() / 0.004)
    return ((colour + background + direction + shape) / 4).float()


@functools.cache
def _expected_area(shape: str) -> float:
    centre = torch.tensor([8.0])
    return object_alpha(shape, centre, centre, 16).sum().item()


def ood_score(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Held out, never trained on: does the clip look like the world's real clips? The object keeps
    its natural size (a reward hacker may grow or smear it) and travels at the world's mean speed of
    one pixel per frame (neither frozen nor teleporting; real clips vary by chunk around it, see
    `common.toy.world.chunk_velocities`). 1 = like a real render at exactly that speed."""
    _check(videos, prompts)
    alpha, _ = _decompose(videos, prompts)
    area, cx, cy = _moments(alpha)
    expected = torch.tensor([_expected_area(ToyPrompt.parse(p).shape) for p in prompts])
    size = torch.exp(-torch.log(area.clamp_min(0.5) / expected[:, None]).square().mean(1) / 0.1)
    frames = videos.shape[2]
    travel = torch.sqrt((cx[:, -1] - cx[:, 0]).square() + (cy[:, -1] - cy[:, 0]).square())
    speed = torch.exp(-(travel / (frames - 1) - 1.0).square() / 0.1)
    return (0.5 * size + 0.5 * speed).float()


TOY_REWARDS = {"vq": visual_quality, "mq": motion_quality, "ta": text_alignment, "ood": ood_score}


def score(videos: torch.Tensor, prompts: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    unknown = [n for n in names if n not in TOY_REWARDS]
    if unknown:
        raise ValueError(f"unknown toy reward(s) {unknown}; known: {sorted(TOY_REWARDS)}")
    return {name: TOY_REWARDS[name](videos, prompts) for name in names}


__all__ = ["TOY_REWARDS", "score", "visual_quality", "motion_quality", "text_alignment", "ood_score", "SHAPES"]
