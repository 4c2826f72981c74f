"""The one reward-model interface, and what every model shares: input checks and frame sampling.

A reward model is called with a batch of decoded videos and their prompts and answers one float
score per video for each of the components it declares:

    model.components                      # e.g. ["vq", "mq", "ta", "overall"]
    model(frames, prompts, fps=16.0)      # frames uint8 [B, F, H, W, 3] -> {name: float32 [B]}

The reward server (rewards/server.py) owns a list of them, batches requests across groups and
calls each once per batch; `python -m rewards.score` calls them on mp4 files.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from common.errors import RewardError

log = logging.getLogger(__name__)


class RewardModel:
    """Base class. Subclasses set `components` and implement `score`."""

    components: list[str] = []
    #: the name used in stats and logs ("videoalign", "clip", ...)
    name: str = "reward"

    def __call__(self, frames: torch.Tensor, prompts: list[str], fps: float = 16.0) -> dict[str, torch.Tensor]:
        check_video_batch(frames, prompts)
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise RewardError(f"fps must be a positive number, got {fps!r}")
        with torch.inference_mode():
            out = self.score(frames, list(prompts), float(fps))
        missing = [c for c in self.components if c not in out]
        if missing:
            raise RewardError(f"{self.name}: declared component(s) {missing} not returned")
        return {k: torch.as_tensor(v).detach().float().cpu().reshape(-1) for k, v in out.items()}

    def score(self, frames: torch.Tensor, prompts: list[str], fps: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def check_video_batch(frames, prompts) -> None:
    """uint8 [B, F, H, W, 3], B >= 1, F >= 1, H, W >= 1, one prompt (a str) per video."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise RewardError(
            f"videos must be uint8 [B, F, H, W, 3], got "
            f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}"
        )
    if 0 in frames.shape:
        raise RewardError(f"empty video batch {tuple(frames.shape)}")
    if isinstance(prompts, str) or len(prompts) != frames.shape[0]:
        n = 1 if isinstance(prompts, str) else len(prompts)
        raise RewardError(f"{frames.shape[0]} videos but {n} prompts")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise RewardError(f"prompts must be strings; not at {bad}")


def fps_frame_indices(
    total: int, video_fps: float, fps: float = 2.0, frame_factor: int = 2, min_frames: int = 4, max_frames: int = 768
) -> list[int]:
    """Indices of the frames Qwen-VL's video reader keeps when sampling at `fps` (qwen-vl-utils'
    rule, which VideoAlign uses): n = (total / video_fps) * fps, clamped to [min_frames,
    min(max_frames, total)] (bounds rounded to the frame factor), rounded to a multiple of
    `frame_factor`, then evenly spaced indices from the first to the last frame. Clips shorter
    than `frame_factor` frames repeat their last frame (the model needs whole temporal patches)."""
    if total < 1:
        raise RewardError("a video needs at least one frame")
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = math.floor(min(max_frames, total) / frame_factor) * frame_factor
    n = total / video_fps * fps
    n = round(min(max(n, lo), max(hi, frame_factor)) / frame_factor) * frame_factor
    n = max(frame_factor, min(n, max(total // frame_factor * frame_factor, frame_factor)))
    return torch.linspace(0, total - 1, n).round().long().tolist()


def uniform_frame_indices(total: int, n: int) -> list[int]:
    """n frames evenly spaced over the clip, first and last included (fewer if the clip is shorter)."""
    n = max(1, min(n, total))
    return torch.linspace(0, total - 1, n).round().long().tolist()


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 128 * 28 * 28, max_pixels: int = 448 * 448
) -> tuple[int, int]:
    """Qwen-VL's frame size rule: both sides multiples of `factor`, aspect ratio kept, area within
    [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise RewardError(f"aspect ratio of {height}x{width} is beyond 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RewardError(f"reward model device {device!r} but CUDA is not available here")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptTruncated(UserWarning):
    """A prompt was longer than the reward model's limit and was cut."""


def truncate_tokens(ids: list[int], limit: int, what: str) -> list[int]:
    if len(ids) > limit:
        message = f"{what}: prompt of {len(ids)} tokens truncated to the model's limit of {limit}"
        warnings.warn(message, PromptTruncated, stacklevel=3)
        log.warning(message)
        return ids[:limit]
    return ids
