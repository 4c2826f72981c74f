"""Optional experiment tracking in TensorBoard (run.tensorboard): the metrics.jsonl records as scalars
and the start/end sample videos as animated GIFs, next to what the run folder keeps anyway.

    log_metrics, save_samples, close = tracked(folder.log, folder.save_samples, folder.root / "tensorboard")

Scalars: every numeric top-level value of a record, tagged "<phase>/<key>" (on_policy/reward_mean,
semi/loss, on_policy/reward/<component>); evaluation records put their policy in the tag
(eval/<policy>/reward). The step is the record's `iteration` where it has one (the training
phases); other records (evaluations, the reference phase, resumes) count their own steps per tag from
0 in this process. NaN and infinities are written as they are (TensorBoard marks them on the chart);
strings, lists, dicts, booleans and None are left out.

Videos: each sample video is decoded from its mp4 bytes and logged as an animated GIF image summary
(what SummaryWriter.add_video makes, without moviepy), one image tag per video,
"samples/<tag>/<i>", with its prompt as the tag's description; the start samples at step 0, the end
samples at step 1. GIF frames identical to the one before are merged by PIL into one longer frame.

torch.utils.tensorboard, PyAV and PIL are imported when used, so importing this module costs nothing."""

from __future__ import annotations

import io
import logging
import numbers
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("arcopo")

# The step of each sample set: the start samples before training, the end samples after.
SAMPLE_STEPS = {"start": 0, "end": 1}


def decode_mp4_bytes(data: bytes):
    """mp4 bytes -> (uint8 frames as a numpy array [F, H, W, 3], fps): common.video.read_mp4 on bytes."""
    import av
    import numpy as np

    if not data:
        raise ValueError("empty video (0 bytes)")
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 0) or 16.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except IndexError:
        raise ValueError("the video has no video stream") from None
    except av.error.FFmpegError as exc:
        raise ValueError(f"not a readable video ({exc})") from None
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames), fps


def encode_gif(frames, fps: float) -> bytes:
    """uint8 frames [F, H, W, 3] -> an animated GIF that loops, at (about) fps frames a second."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(
        out,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000.0 / fps)),
        loop=0,
    )
    return out.getvalue()


def scalar_value(value) -> float | None:
    """The float TensorBoard gets for a record's value; None for what is not a number (bools too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class TensorBoardLog:
    """One run's TensorBoard event files under `log_dir` (made if missing)."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._counts: dict[str, int] = defaultdict(int)

    def record(self, record: dict) -> None:
        """One metrics.jsonl record as scalars (the module docstring says which, and their steps)."""
        phase = str(record.get("phase") or "run")
        prefix = phase
        if phase == "eval" and record.get("policy") is not None:
            prefix = f"eval/{record['policy']}"
        iteration = record.get("iteration")
        has_iteration = isinstance(iteration, numbers.Integral) and not isinstance(iteration, bool)
        for key, value in record.items():
            if key == "iteration":
                continue
            number = scalar_value(value)
            if number is None:
                continue
            tag = f"{prefix}/{key}"
            if has_iteration:
                step = int(iteration)
            else:
                step = self._counts[tag]
                self._counts[tag] += 1
            self._writer.add_scalar(tag, number, step)

    def videos(self, tag: str, prompts: list[str], mp4s: list[bytes], step: int) -> None:
        """Each video as an animated GIF under "<tag>/<i>", its prompt as the description."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.image.metadata import create_summary_metadata

        if len(prompts) != len(mp4s):
            raise ValueError(f"{len(prompts)} prompts for {len(mp4s)} videos")
        values = []
        for i, (prompt, data) in enumerate(zip(prompts, mp4s, strict=True)):
            frames, fps = decode_mp4_bytes(data)
            image = Summary.Image(
                height=int(frames.shape[1]),
                width=int(frames.shape[2]),
                colorspace=3,
                encoded_image_string=encode_gif(frames, fps),
            )
            metadata = create_summary_metadata(display_name=f"{tag}/{i}", description=prompt)
            values.append(Summary.Value(tag=f"{tag}/{i}", image=image, metadata=metadata))
        if values:
            self._writer.file_writer.add_summary(Summary(value=values), global_step=step)
            self._writer.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tracked(
    log_metrics: Callable[[dict], None],
    save_samples: Callable[[str, list[str], list[bytes]], list[str]],
    log_dir: Path | None,
) -> tuple[Callable[[dict], None], Callable[[str, list[str], list[bytes]], list[str]], Callable[[], None]]:
    """(log_metrics, save_samples, close) that also write to TensorBoard under log_dir; with log_dir
    None, the two callables unchanged and a close that does nothing.

    The wrapped callables run first (metrics.jsonl and the mp4 files stay the run's record); a
    TensorBoard failure after them is logged as a warning and does not stop the run."""
    if log_dir is None:
        return log_metrics, save_samples, lambda: None
    board = TensorBoardLog(log_dir)

    def log_and_track(record: dict) -> None:
        log_metrics(record)
        try:
            board.record(record)
        except Exception:
            log.warning("tensorboard: could not log the %r record", record.get("phase"), exc_info=True)

    def save_and_track(tag: str, prompts: list[str], videos: list[bytes]) -> list[str]:
        paths = save_samples(tag, prompts, videos)
        try:
            board.videos(f"samples/{tag}", prompts, videos, SAMPLE_STEPS.get(tag, 0))
        except Exception:
            log.warning("tensorboard: could not log the %r sample videos", tag, exc_info=True)
        return paths

    return log_and_track, save_and_track, board.close
