"""Videos as frames and files: the float <-> uint8 frame conversions every role uses, and mp4 (H.264)
in and out with PyAV, for sample videos, reports, offline scoring and the streaming generator
(Mp4Writer takes a video's frames as they are made; encode_mp4 is it given them all at once)."""

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


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


class Mp4Writer:
    """An H.264 mp4 built frame batch by frame batch: `write(frames)` encodes uint8 [F, H, W, 3] as they
    come (a streaming generator's chunks), so raw frames never pile up; only the compressed stream is
    kept. `upscale` repeats pixels so tiny toy videos can be watched; H.264 needs even sizes, so odd
    ones are padded by one pixel. Every batch must have the first one's size.

        with Mp4Writer(path, fps=16.0) as video:
            for frames in chunks:
                video.write(frames)

    With a `path`, the file appears whole at `close()` (through common.durable, under a temporary name
    then renamed) and never if the block raises: a plain mp4 is unreadable until its index, written
    last, is there, so a file on disk before the end would only be a torn one. Without a path,
    `close()` returns the bytes (what encode_mp4 does)."""

    def __init__(self, path: str | Path | None = None, fps: float = 16.0, upscale: int = 1):
        import av  # PyAV (FFmpeg) only where files are made: roles that merely convert frames never load it

        if upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {upscale}")
        self.path = None if path is None else Path(path)
        self.fps, self.upscale = fps, upscale
        self.frames = 0
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._stream = None
        self._av = av

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        if self._container is None:
            raise ValueError("Mp4Writer: write after close")
        arr = _as_frames(frames)
        if self.upscale > 1:
            arr = arr.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
        if pad_h or pad_w:
            arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
            self._stream.width, self._stream.height = arr.shape[2], arr.shape[1]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "18", "preset": "veryfast"}
        elif (arr.shape[2], arr.shape[1]) != (self._stream.width, self._stream.height):
            raise ValueError(
                f"frames of {arr.shape[1]}x{arr.shape[2]} after frames of {self._stream.height}x{self._stream.width}"
                f" (sizes after upscale {self.upscale} and padding to even)"
            )
        for frame in arr:
            self._container.mux(self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += arr.shape[0]

    def close(self) -> bytes:
        """Flush the encoder and finish the mp4; with a path, put the file in place. Returns the bytes."""
        if self._container is None:
            raise ValueError("Mp4Writer: already closed")
        if self.frames == 0:
            self.abort()
            raise ValueError(f"no frames written{f' to {self.path}' if self.path else ''}: an mp4 needs at least one")
        self._container.mux(self._stream.encode())
        self._container.close()
        self._container = None
        data = self._buffer.getvalue()
        if self.path is not None:
            write_bytes_atomic(self.path, data)
        return data

    def abort(self) -> None:
        """Drop what was encoded; nothing is written."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except self._av.error.FFmpegError:
                pass  # a container without a stream or frames cannot write its trailer; it is dropped anyway


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: float = 8.0, upscale: int = 1) -> bytes:
    """uint8 frames [F, H, W, 3] -> H.264 mp4 bytes: an Mp4Writer given every frame at once."""
    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {arr.dtype} {arr.shape}")
    video = Mp4Writer(None, fps=fps, upscale=upscale)
    try:
        video.write(arr)
    except BaseException:
        video.abort()
        raise
    return video.close()


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
