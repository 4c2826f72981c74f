"""cluster/report.py: the page escapes what it is given and leaves out what it is not given (fast), and
in Debian's real headless Chromium it loads, every video decodes with a duration near F / fps, and it
paints the videos' frames (cluster-marked: it starts a browser)."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cluster.report import KEYS, render, write_report

FRAMES, SIZE, FPS = 8, 64, 8.0
# Flat, saturated colours the page's CSS never uses: finding them in the screenshot means the browser
# decoded the video frames and painted them, not merely that it drew the page around them.
BEFORE_RGB, AFTER_RGB = (255, 0, 255), (0, 255, 255)


def _frames(rgb: tuple[int, int, int]) -> np.ndarray:
    """A flat colour with a dark bar moving across it, so the video is not a still."""
    video = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    video[:] = rgb
    for f in range(FRAMES):
        x = f * SIZE // FRAMES
        video[f, :, x : x + SIZE // FRAMES] = 20
    return video


def _full_report(prompt: str = "a red square moves left") -> dict:
    return {
        "title": "AR-CoPO run demo",
        "subtitle": "configs/toy.yaml, 30 on-policy iterations, 2026-11-30",
        "samples": [
            {"prompt": prompt, "before": "samples/start_0.mp4", "after": "samples/end_0.mp4"},
            {"prompt": "a blue circle grows", "before": "samples/start_1.mp4", "after": "samples/end_1.mp4"},
        ],
        "before_label": "reference (base)",
        "after_label": "merged, s = 0.8",
        "scores": [
            {"policy": "reference (base)", "in_domain": [0.99712, 0.0043], "out_of_domain": [0.5, 0.01]},
            {"policy": "merged, s = 0.8", "in_domain": [1.0312, 0.0041], "out_of_domain": [0.51, 0.012], "note": "n"},
        ],
        "score_names": {"in_domain": "training reward (vq + mq + ta)", "out_of_domain": "held-out score (ood)"},
        "verdict": "Chosen merge scale 0.8: both scores improve on the base.",
        "warnings": ["the margin over the base is within two standard errors"],
        "plots": [
            {"title": "reward curve", "path": "reward_curve.png"},
            {"title": "merge sweep", "path": "eval/x.png"},
        ],
        "facts": {"groups": 480, "wall time": "21 min", "learning rate": 3e-05},
    }


def _make_run(run_dir: Path) -> None:
    from PIL import Image

    from common.video import encode_mp4

    (run_dir / "samples").mkdir(parents=True)
    for i in range(2):
        (run_dir / "samples" / f"start_{i}.mp4").write_bytes(encode_mp4(_frames(BEFORE_RGB), fps=FPS))
        (run_dir / "samples" / f"end_{i}.mp4").write_bytes(encode_mp4(_frames(AFTER_RGB), fps=FPS))
    ramp = np.linspace(0, 255, 240, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (160, 1))] * 3, axis=-1)).save(run_dir / "reward_curve.png")


# ---------------------------------------------------------------------------------------------------
# Fast: no browser, no video files needed.


def test_user_text_is_escaped_everywhere(tmp_path):
    evil = "<script>alert('x')</script> & <b>bold</b>"
    report = _full_report(prompt=evil)
    report["title"] = evil
    report["verdict"] = evil
    report["warnings"] = [evil]
    report["scores"][0]["policy"] = evil
    report["score_names"]["in_domain"] = evil
    report["facts"] = {evil: evil}
    report["plots"] = [{"title": evil, "path": "missing.png"}]
    page = write_report(tmp_path, report).read_text()
    assert "<script>alert" not in page and "<b>bold" not in page
    assert page.count("<script>") == 1  # the page's own
    assert html.escape(evil) in page


def test_only_a_title_renders_and_missing_files_become_notes(tmp_path):
    page = write_report(tmp_path, {"title": "bare"}).read_text()
    assert "<title>bare</title>" in page and "<h1>bare</h1>" in page
    for section in ("Samples", "Scores", "Plots", "Facts", 'class="verdict"', 'class="warning"', "<video"):
        assert section not in page

    report = _full_report()
    report["samples"].append({"prompt": "only after", "after": "../outside.mp4"})
    del report["score_names"], report["before_label"]
    page = render(tmp_path, report)
    assert "<video" not in page  # no file exists, so no dead players
    assert "samples/start_0.mp4 (not found)" in page and "../outside.mp4 (outside the run folder)" in page
    assert "merge sweep: eval/x.png (not found), skipped" in page
    assert "<th>in_domain</th>" in page and "before</figcaption>" in page


def test_scores_show_mean_and_stderr_to_the_error_bars_precision(tmp_path):
    page = render(tmp_path, _full_report())
    assert "0.9971 ± 0.0043" in page and "1.0312 ± 0.0041" in page and "0.510 ± 0.012" in page
    assert "<th>training reward (vq + mq + ta)</th>" in page and "<td>n</td>" in page


def test_the_contract_is_checked(tmp_path):
    with pytest.raises(ValueError, match="title"):
        render(tmp_path, {"subtitle": "no title"})
    with pytest.raises(ValueError, match="warning"):
        render(tmp_path, {"title": "t", "warning": ["misspelt"]})
    assert set(_full_report()) == set(KEYS)


# ---------------------------------------------------------------------------------------------------
# The real browser.


def _chromium(profile: Path, *args: str, budget_ms: int) -> subprocess.CompletedProcess:
    # Root needs --no-sandbox; a profile of its own keeps runs apart from each other and from ~/.config.
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--mute-audio",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _durations(dom: str) -> list[dict] | None:
    match = re.search(r'<pre id="video-durations"[^>]*>(.*?)</pre>', dom, re.S)
    return json.loads(html.unescape(match.group(1))) if match and match.group(1).strip() else None


@pytest.mark.cluster
def test_chromium_plays_every_video_and_paints_the_page(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (`make install` installs it where apt-get can run)")
    from PIL import Image

    run_dir = tmp_path / "run"
    _make_run(run_dir)
    page = write_report(run_dir, _full_report(prompt="<script>alert(1)</script>"))
    url = page.resolve().as_uri()

    # Media loads on real threads while the page runs on virtual time: poll with a growing budget
    # rather than trust one budget on a loaded 2-core machine.
    for budget in (3000, 10000, 30000):
        proc = _chromium(tmp_path / "profile", "--dump-dom", url, budget_ms=budget)
        assert proc.returncode == 0, proc.stderr[-2000:]
        durations = _durations(proc.stdout)
        if durations and all(d["duration"] is not None or d["error"] for d in durations):
            break
    dom = proc.stdout
    assert "<h1>AR-CoPO run demo</h1>" in dom
    assert "<script>alert(1)" not in dom
    assert durations is not None and len(durations) == 4, dom[-3000:]
    for d in durations:
        # A codec this chromium cannot play shows up here as an error (code 4) and no duration.
        assert d["error"] is None, f"{d['src']}: {d['error']}"
        assert isinstance(d["duration"], float | int) and math.isfinite(d["duration"]), d
        assert abs(d["duration"] - FRAMES / FPS) < 0.25, d
    assert len(re.findall(r'<video [^>]*data-duration="', dom)) == 4

    shot = tmp_path / "report.png"
    proc = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1100,1600", url, budget_ms=5000)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10, "the screenshot is blank"
    for rgb in (BEFORE_RGB, AFTER_RGB):
        near = (np.abs(img - np.array(rgb)).max(axis=-1) < 40).sum()
        assert near > 2000, f"no decoded video frame of colour {rgb} was painted ({near} pixels)"
