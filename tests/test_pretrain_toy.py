"""learner.pretrain_toy: the teacher ODE, both stages end to end (tiny budget), and the property the
committed toy generator exists for: its few-step samples depend on each chunk's initial noise."""

from __future__ import annotations

import csv
import math

import torch
from PIL import Image

from common.config import load_config
from common.model.causal_wan import CausalWanTransformer3DModel
from common.model.loading import load_policy, load_text_encoder
from common.model.sampler import StreamingSampler
from learner.pretrain_toy import main, ode_endpoints, ode_sigmas
from rewards.toy import score

PROMPT = "a green circle moving right on a gray background"


def test_ode_grid_runs_from_pure_noise_to_clean():
    grid = ode_sigmas(8, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 9
    assert all(a > b for a, b in zip(grid, grid[1:], strict=False))
    assert ode_sigmas(4, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_ode_endpoints_with_cache_match_the_full_sequence_euler():
    cfg = load_config("configs/toy.yaml", ["model.diffusers_transformer=null"])
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).eval()
    sampler = StreamingSampler.from_config(model, cfg)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 4, 16, generator=gen)
    context = torch.randn(2, 3, 4, 16, 16, generator=gen)
    noise = torch.randn(2, 3, 2, 16, 16, generator=gen)
    got = ode_endpoints(model, sampler, text, context, noise, ode_steps=3, shift=3.0)
    x, grid = noise, ode_sigmas(3, 3.0)
    with torch.no_grad():
        for sig, nxt in zip(grid, grid[1:], strict=False):
            t = torch.zeros(2, 6)
            t[:, 4:] = sig * 1000
            flow = model(torch.cat([context, x], 2), t, text, return_dict=False, frames_per_chunk=2)[0]
            x = x + (nxt - sig) * flow[:, :, 4:]
    assert torch.allclose(got, x, atol=1e-4)


def test_both_stages_run_end_to_end(tmp_path):
    common = ["--threads", "1", "--batch-size", "2", "--steps", "2"]
    assert (
        main(
            [
                *common,
                "--sigma-sampling",
                "uniform",
                "--out",
                str(tmp_path / "teacher"),
                "model.diffusers_transformer=null",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                *common,
                "--distill-from",
                str(tmp_path / "teacher"),
                "--pool-size",
                "4",
                "--ode-steps",
                "2",
                "--out",
                str(tmp_path / "student"),
            ]
        )
        == 0
    )
    for stage in ("teacher", "student"):
        assert {"config.json", "diffusion_pytorch_model.safetensors", "loss.csv", "samples.png"} <= {
            p.name for p in (tmp_path / stage).iterdir()
        }
        # One row per optimiser step, each a finite positive loss, in time order.
        with open(tmp_path / stage / "loss.csv") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["step", "loss", "seconds"] and [int(r[0]) for r in rows] == [0, 1]
        losses, seconds = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
        assert all(math.isfinite(v) and v > 0 for v in losses) and seconds == sorted(seconds), rows
        # samples.png: 6 prompts x (ground truth, sample) rows of 8 frames of 16 x 16, scaled 4x.
        with Image.open(tmp_path / stage / "samples.png") as png:
            assert png.format == "PNG" and png.size == (8 * 16 * 4, 6 * 2 * 16 * 4)
    teacher = CausalWanTransformer3DModel.from_pretrained(str(tmp_path / "teacher"))
    student = CausalWanTransformer3DModel.from_pretrained(str(tmp_path / "student"))

    def architecture(model):  # the config less diffusers' bookkeeping (_name_or_path, ...)
        return {k: v for k, v in model.config.items() if not k.startswith("_")}

    assert architecture(student) == architecture(teacher)
    # Stage two starts from a copy of the teacher and trains it: the saved student is not the teacher
    # (saving the wrong model would make them equal), and it moved by about what two AdamW steps move.
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True)
    )
    assert 1e-6 < moved < 0.1, moved
    # What the job does with it: the student is a generator the streaming sampler loads and runs.
    cfg = load_config("configs/toy.yaml", [f"model.diffusers_transformer={tmp_path / 'student'}"])
    sampler = StreamingSampler.from_config(load_policy(cfg), cfg)
    with torch.no_grad():
        video = sampler.generate(load_text_encoder(cfg).encode([PROMPT]), sampler.noise_plan(0))
    assert video.shape == (1, 3, 8, 16, 16) and torch.isfinite(video).all()


def test_the_committed_generator_forks_into_different_samples_at_every_pivot():
    # AR-CoPO explores through a chunk's initial noise: neighbours (sigma 0.5) must end in visibly
    # different pivot chunks with different rewards, or the group advantages are amplified noise.
    # Replaced generators: the flow-matching-only one, 1e-4 per pixel at every pivot; the shift-1
    # distilled one, 0.05 at pivot 0 but 1.6e-4 at pivots 1-3 (its later steps washed the first
    # step's choice out). The committed one: ~0.05 at pivot 0 and ~0.02 at pivots 1-3 (docs/results.md).
    cfg = load_config("configs/toy.yaml")
    sampler = StreamingSampler.from_config(load_policy(cfg), cfg)
    text = load_text_encoder(cfg).encode([PROMPT])
    f = sampler.frames_per_chunk
    for pivot in range(sampler.num_chunks):
        spreads, stds = [], []
        for seed in range(3):
            group = sampler.fork(text, sampler.noise_plan(seed), pivot=pivot, group_size=12, sigma=0.5, fork_seed=seed)
            videos = group.videos.clamp(-1.0, 1.0)  # the generator's frames, unquantised
            spreads.append(videos[:, :, pivot * f : (pivot + 1) * f].std(0).mean().item())
            stds.append(sum(score(videos, [PROMPT] * 12, ["vq", "mq", "ta"]).values()).std().item())
        assert min(spreads) > 5e-3, (pivot, spreads)  # 30x the shift-1 generator's at pivots 1-3
        assert sum(stds) / 3 > 5e-3, (pivot, stds)  # as asserted at pivot 0 before; measured 0.012-0.072
