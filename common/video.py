"""Videos as frames and files: the float <-> uint8 frame conversions every role uses, and mp4 (H.264)
in and out with PyAV, for sample videos, reports and offline scoring."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from common.durable import write_bytes_atomic


def to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    return ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] (what decoders and mp4 files give) -> [B, 3, F, H, W] in [-1, 1], the
    layout the toy rewards (rewards/toy.py) read.

    Frames are made contiguous first, as a reward server's batching (torch.cat) makes them: the toy
    rewards' float sums run in memory order, so another layout would move scores in the last bit
    between the job and an in-process caller."""
    return frames.contiguous().permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: float = 8.0, upscale: int = 1) -> bytes:
    """uint8 frames [F, H, W, 3] -> H.264 mp4 bytes. `upscale` repeats pixels so tiny toy videos can
    be watched; H.264 needs even sizes, so odd ones are padded by one pixel."""
    import av  # PyAV (FFmpeg) only where files are made: roles that merely convert frames never load it

    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {arr.dtype} {arr.shape}")
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_mp4(path: str | Path, frames: torch.Tensor | np.ndarray, fps: float = 16.0, upscale: int = 1) -> Path:
    """uint8 frames [F, H, W, 3] -> an H.264 mp4 file, written atomically."""
    return write_bytes_atomic(path, encode_mp4(frames, fps=fps, upscale=upscale))


def read_mp4(path: str | Path) -> tuple[torch.Tensor, float]:
    """mp4 -> (uint8 frames [F, H, W, 3], fps). ValueError for an empty file, a file that is not a
    video, or a video without frames; FileNotFoundError when there is no file."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 0) or 16.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except IndexError:
        raise ValueError(f"{path}: has no video stream") from None
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: not a readable video ({exc})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return torch.from_numpy(np.stack(frames)), fps
