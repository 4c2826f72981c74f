"""mp4 (H.264) in and out with PyAV, for sample videos, reports and offline scoring."""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: float = 8.0, upscale: int = 1) -> bytes:
    """uint8 frames [F, H, W, 3] -> H.264 mp4 bytes. `upscale` repeats pixels so tiny toy videos can
    be watched; H.264 needs even sizes, so odd ones are padded by one pixel."""
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


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_mp4(path: str | Path, frames: torch.Tensor | np.ndarray, fps: float = 16.0, upscale: int = 1) -> Path:
    """uint8 frames [F, H, W, 3] -> an H.264 mp4 file, written atomically."""
    return write_bytes_atomic(path, encode_mp4(frames, fps=fps, upscale=upscale))


def read_mp4(path: str | Path) -> tuple[torch.Tensor, float]:
    """mp4 -> (uint8 frames [F, H, W, 3], fps). ValueError for an empty file, a file that is not a
    video, or a video without frames; FileNotFoundError when there is no file."""
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
