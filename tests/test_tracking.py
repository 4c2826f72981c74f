"""cluster/tracking.py: records and sample videos go into TensorBoard event files, read back here with
TensorBoard's own readers (the legacy EventAccumulator, and the plugin accumulator the image dashboard
reads through)."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest

from cluster.tracking import TensorBoardLog, tracked
from common.video import encode_mp4

pytest.importorskip("tensorboard")

F, H, W = 5, 16, 24  # even sizes: H.264 pads odd ones


def frames(seed: int, f: int = F, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [f, h, w, 3]: a smooth colour field (H.264 keeps it close), its own per seed, every frame
    distinct (PIL merges a GIF frame equal to the one before into it)."""
    colour = np.array([60 + 50 * seed, 200 - 40 * seed, 90 + 30 * seed]).reshape(1, 1, 1, 3)
    ramp = np.linspace(0, 40, w).reshape(1, 1, w, 1)
    steps = (np.arange(f) * 25).reshape(f, 1, 1, 1)
    return np.broadcast_to(np.clip(colour + ramp + steps, 0, 255), (f, h, w, 3)).astype(np.uint8)


ON_POLICY = {
    "phase": "on_policy",
    "iteration": 3,
    "version": 4,
    "groups": 2,
    "job_ids": ["a", "b"],
    "reward_mean": 0.25,
    "reward/clip": 0.5,
    "loss": -1.5,
    "record_bytes": [10, 20],
}
EVAL_BASE = {"phase": "eval", "policy": "base", "reward": 0.125, "reward_stderr": 0.01, "videos": 8}
EVAL_MERGED = {"phase": "eval", "policy": "merged", "merge_scale": 0.8, "reward": 0.375, "videos": 8}
RESUME = {"phase": "resume", "checkpoint": "semi-0005", "version": 6, "ood": math.nan, "ok": True, "none": None}


def accumulate(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def written(tmp_path):
    """A tracked run folder stand-in: the records and sample videos both sides received."""
    logged, saved = [], []

    def log_metrics(record):
        logged.append(record)

    def save_samples(tag, prompts, videos):
        saved.append((tag, prompts, videos))
        return [f"samples/{tag}_{i}.mp4" for i in range(len(videos))]

    log_dir = tmp_path / "tensorboard"
    log, samples, close = tracked(log_metrics, save_samples, log_dir)
    start = [encode_mp4(frames(0)), encode_mp4(frames(1))]
    end = [encode_mp4(frames(2))]
    returned = {"start": samples("start", ["a red ball", "a blue cube"], start)}
    for record in (ON_POLICY, {**ON_POLICY, "iteration": 4, "loss": -2.0}, EVAL_BASE, EVAL_MERGED, EVAL_BASE, RESUME):
        log(record)
    returned["end"] = samples("end", ["a green cone"], end)
    close()
    return {"log_dir": log_dir, "logged": logged, "saved": saved, "returned": returned, "start": start, "end": end}


def test_records_become_scalars_with_phase_policy_tags_and_steps(written):
    got = scalars(accumulate(written["log_dir"]))
    nan = got.pop("resume/ood")
    assert len(nan) == 1 and nan[0][0] == 0 and math.isnan(nan[0][1])
    assert got == {
        # training records: step = iteration; lists, strings and the iteration itself are no scalars
        "on_policy/version": [(3, 4.0), (4, 4.0)],
        "on_policy/groups": [(3, 2.0), (4, 2.0)],
        "on_policy/reward_mean": [(3, 0.25), (4, 0.25)],
        "on_policy/reward/clip": [(3, 0.5), (4, 0.5)],
        "on_policy/loss": [(3, -1.5), (4, -2.0)],
        # evaluations: the policy in the tag, a count per tag as the step
        "eval/base/reward": [(0, 0.125), (1, 0.125)],
        "eval/base/reward_stderr": [(0, pytest.approx(0.01)), (1, pytest.approx(0.01))],
        "eval/base/videos": [(0, 8.0), (1, 8.0)],
        "eval/merged/merge_scale": [(0, pytest.approx(0.8))],
        "eval/merged/reward": [(0, 0.375)],
        "eval/merged/videos": [(0, 8.0)],
        # a string, a bool and None are skipped
        "resume/version": [(0, 6.0)],
    }


def test_the_wrapped_callables_still_get_everything(written):
    assert written["logged"] == [
        ON_POLICY,
        {**ON_POLICY, "iteration": 4, "loss": -2.0},
        EVAL_BASE,
        EVAL_MERGED,
        EVAL_BASE,
        RESUME,
    ]
    assert [tag for tag, _, _ in written["saved"]] == ["start", "end"]
    assert written["saved"][0][2] == written["start"]
    assert written["returned"] == {
        "start": ["samples/start_0.mp4", "samples/start_1.mp4"],
        "end": ["samples/end_0.mp4"],
    }


def test_sample_videos_are_gifs_per_video_at_steps_0_and_1(written):
    from PIL import Image

    acc = accumulate(written["log_dir"])
    assert sorted(acc.Tags()["images"]) == ["samples/end/0", "samples/start/0", "samples/start/1"]
    for tag, step, seed in (("samples/start/0", 0, 0), ("samples/start/1", 0, 1), ("samples/end/0", 1, 2)):
        (event,) = acc.Images(tag)
        assert (event.step, event.width, event.height) == (step, W, H)
        gif = Image.open(io.BytesIO(event.encoded_image_string))
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames == F
        assert gif.size == (W, H)
        # the frames are this video's (H.264 and the GIF palette are lossy: compare loosely)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"), dtype=np.float64)
        assert np.abs(first - frames(seed)[0]).mean() < 12
        gif.seek(F - 1)
        last = np.asarray(gif.convert("RGB"), dtype=np.float64)
        assert np.abs(last - frames(seed)[F - 1]).mean() < 12


def test_the_image_dashboard_sees_the_gifs_with_their_prompts(written):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    acc = pea.EventAccumulator(str(written["log_dir"]), tensor_size_guidance={"images": 0})
    acc.Reload()
    content = acc.PluginTagToContent("images")
    assert sorted(content) == ["samples/end/0", "samples/start/0", "samples/start/1"]
    described = {tag: acc.SummaryMetadata(tag).summary_description for tag in content}
    assert described == {
        "samples/start/0": "a red ball",
        "samples/start/1": "a blue cube",
        "samples/end/0": "a green cone",
    }
    (event,) = acc.Tensors("samples/end/0")
    width, height, gif = event.tensor_proto.string_val
    assert (int(width), int(height), gif[:6]) == (W, H, b"GIF89a")


def test_tensorboard_log_takes_frames_of_any_size(tmp_path):
    board = TensorBoardLog(tmp_path / "tb")
    board.videos("v", ["p"], [encode_mp4(frames(3, f=2, h=8, w=32))], step=7)
    board.close()
    (event,) = accumulate(tmp_path / "tb").Images("v/0")
    assert (event.step, event.width, event.height) == (7, 32, 8)


def test_without_a_log_dir_the_callables_are_unchanged_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def log_metrics(record):
        pass

    def save_samples(tag, prompts, videos):
        return ["x"]

    log, samples, close = tracked(log_metrics, save_samples, None)
    assert log is log_metrics and samples is save_samples
    log(ON_POLICY)
    assert samples("start", ["p"], [encode_mp4(frames(0))]) == ["x"]
    close()
    assert list(tmp_path.rglob("*")) == []


def test_a_tensorboard_failure_does_not_stop_the_run(tmp_path, caplog):
    saved = []
    log, samples, close = tracked(lambda r: None, lambda t, p, v: saved.append(t) or ["kept"], tmp_path / "tb")
    with caplog.at_level(logging.WARNING, logger="arcopo"):
        assert samples("start", ["p"], [b"not an mp4"]) == ["kept"]
    close()
    assert saved == ["start"]
    assert "could not log the 'start' sample videos" in caplog.text
    assert accumulate(tmp_path / "tb").Tags()["images"] == []


def test_importing_the_module_loads_neither_torch_nor_tensorboard():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, cluster.tracking; print(sorted({'torch', 'tensorboard', 'av', 'PIL'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "[]"
