"""Video I/O, `python -m rewards.score`, the combiner, the config entries, and the reward server with
real (tiny) VideoAlign and CLIP models: per-model latency, bad inputs fail alone, placement options."""

from __future__ import annotations

import asyncio
import json
import warnings

import pytest
import torch

from common.config import ConfigError, load_config
from common.errors import RewardError
from common.toy.world import render_batch
from common.video import encode_mp4, read_mp4, to_uint8, write_mp4
from rewards.combine import RewardCombiner
from rewards.score import main as score_main
from rewards.server import RewardServer, server_options
from rewards.tiny import make_tiny_clip, make_tiny_videoalign

PROMPTS = ["a red circle moving left on a black background", "a green square moving up on a gray background"]


def toy_videos(prompts):
    return to_uint8(render_batch(prompts, seeds=list(range(len(prompts)))))  # [B, F, H, W, 3]


def test_mp4_round_trip_and_clear_errors(tmp_path):
    frames = toy_videos(PROMPTS[:1])[0]
    path = write_mp4(tmp_path / "a.mp4", frames, fps=16.0)
    back, fps = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == torch.uint8 and fps == 16.0
    assert (back.float() - frames.float()).abs().mean() < 20  # H.264 yuv420p is lossy
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        read_mp4(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="not a readable video"):
        read_mp4(tmp_path / "junk.mp4")
    with pytest.raises(FileNotFoundError):
        read_mp4(tmp_path / "missing.mp4")
    assert encode_mp4(frames, fps=8.0)[4:8] == b"ftyp"


def test_score_command_scores_videos_and_names_bad_ones(tmp_path, capsys):
    vids = toy_videos(PROMPTS)
    paths = [str(write_mp4(tmp_path / f"v{i}.mp4", v, fps=16.0)) for i, v in enumerate(vids)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "scores.json"
    assert score_main(["--config", "configs/toy.yaml", *paths, "--prompts", str(prompts), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["video"] for r in data["videos"]] == paths
    for row in data["videos"]:
        assert {"vq", "mq", "ta", "ood", "total"} <= set(row)
        assert row["total"] == pytest.approx(row["vq"] + row["mq"] + row["ta"], rel=1e-5)
    assert data["stats"]["total"]["n"] == 2 and data["stats"]["vq"]["weight"] == 1.0
    # Prompt count mismatch: refused before any model loads.
    assert score_main(["--config", "configs/toy.yaml", paths[0], "--prompts", str(prompts)]) == 2
    assert "1 videos but 2 prompts" in capsys.readouterr().err
    # An empty and an unreadable file fail by name; the good one is still scored.
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 50)
    prompts.write_text("\n".join(PROMPTS + PROMPTS[:1]) + "\n")
    rc = score_main(
        [
            "--config",
            "configs/toy.yaml",
            paths[0],
            str(tmp_path / "empty.mp4"),
            str(tmp_path / "junk.mp4"),
            "--prompts",
            str(prompts),
        ]
    )
    err = capsys.readouterr()
    assert rc == 1 and "empty.mp4: " in err.err and "empty file" in err.err and "junk.mp4" in err.err
    assert "v0.mp4: total=" in err.out


def test_combiner_weights_and_statistics():
    comps = {"vq": torch.tensor([1.0, 3.0]), "ta": torch.tensor([0.0, 2.0]), "ood": torch.tensor([0.5, 0.5])}
    total, stats = RewardCombiner({"vq": 1.0, "ta": 0.5})(comps)
    torch.testing.assert_close(total, torch.tensor([1.0, 4.0]))
    assert stats["vq"]["mean"] == 2.0 and stats["vq"]["std"] == 1.0 and stats["ta"]["contribution"] == 0.5
    assert "weight" not in stats["ood"] and stats["total"]["max"] == 4.0
    with pytest.raises(RewardError, match="not finite"):
        RewardCombiner({"vq": 1.0})({"vq": torch.tensor([float("nan")])})
    with pytest.raises(RewardError, match="missing"):
        RewardCombiner({"mq": 1.0})(comps)
    cfg = load_config("configs/toy.yaml", ["rewards.terms=[{name: vq, weight: 2}, {name: vq}]"])
    with pytest.raises(RewardError, match="listed twice"):
        RewardCombiner.from_config(cfg)


def test_config_entries_are_checked_when_loading():
    cfg = load_config("configs/toy.yaml")
    assert cfg.rewards.models == [] and [t.name for t in cfg.rewards.terms] == ["vq", "mq", "ta"]
    with pytest.raises(ConfigError, match="needs `path`"):
        load_config("configs/toy.yaml", ["rewards.models=[{kind: videoalign}]"])
    with pytest.raises(ConfigError, match=r"rewards.models\[0\].kind"):
        load_config("configs/toy.yaml", ["rewards.models=[{kind: hpsv9, path: /x}]"])
    with pytest.raises(ConfigError, match="declare 1 GPU"):
        load_config("configs/toy.yaml", ["rewards.models=[{kind: clip, path: /x, num_gpus: 1}]"])
    ok = load_config(
        "configs/toy.yaml",
        [
            "rewards.num_gpus_per_server=1",
            "rewards.models=[{kind: clip, path: /x, num_gpus: 1}]",
            "rewards.runtime_env={env_vars: {A: '1'}}",
            "rewards.resources={rm: 1}",
        ],
    )
    assert server_options(ok) == {"runtime_env": {"env_vars": {"A": "1"}}, "resources": {"rm": 1.0}}
    assert server_options(cfg) == {}


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    va, clip = make_tiny_videoalign(root / "videoalign"), make_tiny_clip(root / "clip")
    cfg = load_config(
        "configs/toy.yaml",
        [
            f"rewards.models=[{{kind: videoalign, path: {va}}}, {{kind: clip, path: {clip}, num_frames: 2}}, "
            "{kind: toy, prefix: toy_, components: [vq, ood]}]",
            "rewards.terms=[{name: overall}, {name: clip_score, weight: 0.01}, {name: toy_vq, weight: 0}]",
            "run.out_of_domain.terms=[{name: toy_ood}]",
            "rewards.batch_timeout_s=0.2",
            "rewards.video_fps=8",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RewardServer(cfg.model_dump(mode="json"))


def test_server_with_real_models_batches_and_reports_per_model_latency(real_server):
    s = real_server
    assert {"overall", "clip_score", "vq_raw", "toy_vq", "toy_ood"} <= set(s.get_stats()["components"])

    async def main():
        good = [s.score(toy_videos([p]), [p]) for p in PROMPTS]
        bad = [
            s.score(torch.zeros(1, 8, 16, 16, 3), ["x"]),
            s.score(torch.zeros(1, 8, 0, 16, 3, dtype=torch.uint8), ["x"]),
        ]
        first = await asyncio.gather(*good, *bad, return_exceptions=True)
        # The server still answers after the bad requests (one event loop, as in the Ray actor).
        return first, await s.score(toy_videos(PROMPTS[:1]), PROMPTS[:1])

    (a, b, wrong_dtype, no_pixels), again = asyncio.run(main())
    assert isinstance(wrong_dtype, RewardError) and "uint8" in str(wrong_dtype)
    assert isinstance(no_pixels, RewardError) and "empty" in str(no_pixels)
    for got in (a, b):
        assert torch.isfinite(got["overall"]).all() and torch.isfinite(got["clip_score"]).all()
    stats = s.get_stats()
    assert set(stats["models"]) == {"videoalign", "clip", "toy"}
    for entry in stats["models"].values():
        assert entry["videos"] >= 2 and entry["seconds"] > 0 and entry["ms_per_video"] > 0
    assert torch.isfinite(again["vq"]).all() and torch.isfinite(again["toy_ood"]).all()


def test_clashing_component_names_need_a_prefix(tmp_path):
    from rewards.registry import build_models

    cfg = load_config("configs/toy.yaml", ["rewards.models=[{kind: toy}, {kind: toy, components: [vq]}]"])
    with pytest.raises(RewardError, match="declared by two models; give one a `prefix`"):
        build_models(cfg)
    cfg = load_config("configs/toy.yaml", ["rewards.terms=[{name: nope}]"])
    with pytest.raises(RewardError, match="unknown toy reward"):
        build_models(cfg)
