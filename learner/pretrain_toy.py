"""Pre-train the toy world's causal generator, so nobody has to: its output is committed.

Two stages, the way Self-Forcing's generator is made (a diffusion model, then a distillation that
makes its few steps map noise to distinct samples).

Stage one, flow matching (the default): one chunk at a time given the clean earlier chunks, through
the same block-causal mask the streaming sampler reproduces with its cache. Each sample picks a
target chunk j; chunks before j enter clean at timestep 0 (exactly what the context pass writes at
sampling time), chunk j enters noised to sigma, and chunks after j cannot influence chunk j through
the causal mask, so they ride along unused. `--sigma-sampling sampler` trains at the sampler's few
sigmas only; `--sigma-sampling uniform` at sigma ~ U(0, 1], a continuous-time model whose
probability-flow ODE is defined everywhere: the teacher of stage two.

Stage two, distillation (`--distill-from TEACHER`): for `--pool-size` (prompt, clean earlier chunks,
noise e) triples it integrates the teacher's ODE (`--ode-steps` Euler steps) to x0*(e), once, then
trains a copy of the teacher so that the sampler's FIRST step maps e at sigma = 1 to x0*(e) (a
one-step generator), while the later steps are trained as in stage one, at their sigmas on rendered
clips: given the sampler's 97% or more signal (shift 0.01), the posterior mean is that sample, so they keep and
sharpen what the first step chose.

Why stage two exists: a flow-matching model's first step predicts the conditional MEAN of the chunk,
whatever the noise, and the consistency sampler re-noises it with solver noise that a fork SHARES,
so its samples barely depend on the initial noise, and AR-CoPO, which explores through exactly that
noise, gets no signal (measured on the stage-one generator: fork branches differed by 1e-4 per pixel,
rewards by 1e-4 within a group). The toy sampler's DEFAULT `sampler.shift` is 0.01 (sigmas 1, 0.029,
0.0099, 0.0033) rather than Self-Forcing's 5.0 (1, 0.94, 0.83, 0.63): the later steps of this small
model cannot recover a later chunk's sub-pixel choice from a re-noised input at any larger sigma
(shift 1: the choice survived step 2 at 4%, shift 0.03: solver noise still moved chunks 1-3 more than
the initial noise), so at larger shifts a fork's branches at pivots 1-3 end alike
(`python -m bench.noise_sensitivity`).

What produced the committed assets/toy_generator (all at --threads 1 on a 2-core CPU). The toy
world's data changed under it: since the per-chunk motion freedom (common/toy/world.py
`chunk_velocities`: at each chunk boundary the velocity is kept or re-drawn) the teacher and the
generator are retrained on it, warm-started from the previous ones:

  1. stage one at the sampler's sigmas (then shift 5), 2500 steps from random weights, on the
     constant-speed world: the generator committed in 09659e3, which no longer ships;
  2. the constant-speed teacher: 400 steps of `--sigma-sampling uniform` from (1), committed in
     0f958d4 as assets/toy_generator/teacher;
  3. the teacher now committed, assets/toy_generator/teacher: 400 more steps of
     `--sigma-sampling uniform` from (2), on the per-chunk-motion world:
        mkdir -p /tmp/teacher0 && for f in config.json diffusion_pytorch_model.safetensors; do \
            git show 0f958d4:assets/toy_generator/teacher/$f > /tmp/teacher0/$f; done
        python -m learner.pretrain_toy --threads 1 --init-from /tmp/teacher0 --sigma-sampling uniform \
            --steps 400 --lr 3e-4 --out assets/toy_generator/teacher           # ~7 min
  4. the generator, reproducible from the committed teacher by one command (the sampler's sigmas,
     which the later steps are trained at, come from the config's shift, 0.01):
        python -m learner.pretrain_toy --threads 1 --distill-from assets/toy_generator/teacher \
            --steps 500 --lr 3e-4 --pool-size 3072 --out assets/toy_generator  # ~3 min

Each run writes a diffusers-format transformer directory plus `samples.png` (ground truth above
streamed few-step samples) and `loss.csv`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.config import Config, load_config_for_cli
from common.model.causal_wan import CausalWanTransformer3DModel
from common.model.sampler import StreamingSampler
from common.toy.world import ToyTextEncoder, all_prompts, render_batch, split_prompts
from common.video import to_uint8


def flow_matching_batch(cfg: Config, sampler, prompts, seeds, generator, sigma_sampling: str = "sampler"):
    """Model input, per-frame timesteps, the flow target and a mask of the frames that count.

    sigma_sampling "sampler": the sampler's few sigmas only; "uniform": sigma ~ U(0, 1], the
    continuous-time model whose probability-flow ODE stage two integrates."""
    s, sched = cfg.sampler, sampler.scheduler
    videos = render_batch(prompts, num_frames=s.num_frames, size=s.height, seeds=seeds)  # [B, 3, F, H, W]
    batch, f = videos.shape[0], s.frames_per_chunk
    target_chunk = torch.randint(0, s.num_chunks, (batch,), generator=generator)
    step = torch.randint(0, sched.num_steps, (batch,), generator=generator)
    sigma = torch.tensor(sched.sigmas)[step]
    if sigma_sampling == "uniform":
        sigma = 1.0 - torch.rand(batch, generator=generator)  # (0, 1]
    elif sigma_sampling != "sampler":
        raise ValueError(f"unknown sigma sampling {sigma_sampling!r}")
    noise = torch.randn(videos.shape, generator=generator)
    frame_chunk = torch.arange(s.num_frames) // f  # [F]
    is_target = frame_chunk[None] == target_chunk[:, None]  # [B, F]
    frame_sigma = torch.where(is_target, sigma[:, None], torch.zeros(()))  # clean context: sigma 0
    sig = frame_sigma[:, None, :, None, None]
    x_t = (1 - sig) * videos + sig * noise
    timesteps = frame_sigma * sched.num_train_timesteps
    return x_t, timesteps, noise - videos, is_target


def ode_sigmas(ode_steps: int, shift: float) -> list[float]:
    """Euler grid of the teacher ODE, 1 -> 0, denser at high noise for shift > 1 (where the
    trajectories decide what the sample becomes)."""
    u = [1 - i / ode_steps for i in range(ode_steps + 1)]
    return [shift * x / (1 + (shift - 1) * x) for x in u]


@torch.no_grad()
def ode_endpoints(teacher, sampler, text, context, noise, ode_steps: int, shift: float = 3.0) -> torch.Tensor:
    """x0*(noise) for the chunk after `context` (clean frames [B, C, start, H, W]): Euler steps along
    the teacher's probability-flow ODE dx/dsigma = flow, the clean context written once into a KV
    cache at timestep 0 (what the streaming sampler's context pass writes)."""
    f, start, batch = sampler.frames_per_chunk, context.shape[2], noise.shape[0]
    num_train = sampler.scheduler.num_train_timesteps
    cache = sampler.new_cache()
    if start:
        teacher(context, torch.zeros(batch), text, cache=cache, write_cache=True, frames_per_chunk=f)
    sigmas = ode_sigmas(ode_steps, shift)
    x = noise
    for sig, nxt in pairwise(sigmas):
        t = torch.full((batch,), sig * num_train)
        flow = teacher(x, t, text, return_dict=False, start_frame=start, cache=cache)[0]
        x = x + (nxt - sig) * flow
    return x


@torch.no_grad()
def ode_pool(teacher, sampler, cfg: Config, args, train_prompts, encoder, generator) -> list[dict]:
    """Stage two's training pairs, computed once: per batch one chunk index, rendered clips of
    random training prompts (their earlier chunks are the clean context), noise e and x0*(e)."""
    s, pool = cfg.sampler, []
    batches = -(-args.pool_size // args.batch_size)
    for _ in tqdm(range(batches), desc="teacher ODE pairs"):
        picks = torch.randint(0, len(train_prompts), (args.batch_size,), generator=generator).tolist()
        prompts = [train_prompts[i] for i in picks]
        seeds = torch.randint(0, 2**31 - 1, (args.batch_size,), generator=generator).tolist()
        videos = render_batch(prompts, num_frames=s.num_frames, size=s.height, seeds=seeds)
        text = encoder.encode([p.text for p in prompts])
        chunk = int(torch.randint(0, s.num_chunks, (1,), generator=generator))
        lo, hi = chunk * s.frames_per_chunk, (chunk + 1) * s.frames_per_chunk
        noise = torch.randn((args.batch_size, *sampler.chunk_shape), generator=generator)
        endpoint = ode_endpoints(teacher, sampler, text, videos[:, :, :lo], noise, args.ode_steps, args.ode_shift)
        pool.append(
            dict(text=text, context=videos[:, :, :lo], data=videos[:, :, lo:hi], noise=noise, endpoint=endpoint)
        )
    return pool


def distill(cfg: Config, args, train_prompts, encoder, generator):
    """Stage two (see the module docstring): returns (student, sampler, loss log)."""
    teacher = CausalWanTransformer3DModel.from_pretrained(str(args.distill_from)).eval().requires_grad_(False)
    student = CausalWanTransformer3DModel.from_pretrained(str(args.distill_from)).train()
    sampler = StreamingSampler.from_config(student, cfg)
    sched, s = sampler.scheduler, cfg.sampler
    start_time = time.time()
    pool = ode_pool(teacher, StreamingSampler.from_config(teacher, cfg), cfg, args, train_prompts, encoder, generator)
    print(f"{len(pool) * args.batch_size} teacher ODE pairs in {time.time() - start_time:.0f} s")
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    sigmas = torch.tensor(sched.sigmas)
    log = []
    bar = tqdm(range(args.steps), desc="distilling toy generator")
    for step in bar:
        entry = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
        context, batch = entry["context"], entry["noise"].shape[0]
        # A `first_step_fraction` of the batch trains the first step, noise e -> x0*(e); the rest
        # trains the later steps as plain flow matching at their sigmas on rendered clips: given
        # 97% or more signal (the toy's shift 0.01) the posterior mean is the sample itself, so they keep and sharpen
        # what the first step chose.
        first = torch.rand(batch, generator=generator) < args.first_step_fraction
        step_idx = torch.where(first, 0, torch.randint(1, sched.num_steps, (batch,), generator=generator))
        sigma = sigmas[step_idx][:, None, None, None, None]
        fresh = torch.randn(entry["data"].shape, generator=generator)
        mask = first[:, None, None, None, None]
        x_t = torch.where(mask, entry["noise"], (1 - sigma) * entry["data"] + sigma * fresh)
        target = torch.where(mask, entry["endpoint"], entry["data"])
        t = torch.zeros(batch, context.shape[2] + s.frames_per_chunk)
        t[:, context.shape[2] :] = sigma.flatten()[:, None] * sched.num_train_timesteps
        flow = student(
            torch.cat([context, x_t], dim=2), t, entry["text"], return_dict=False, frames_per_chunk=s.frames_per_chunk
        )[0]
        x0 = x_t - sigma * flow[:, :, context.shape[2] :]
        loss = (x0 - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append((step, loss.item(), time.time() - start_time))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.eval(), sampler, log


def save_samples(sampler, encoder, prompts, path: Path, seed: int = 0) -> None:
    """A PNG grid: for each prompt, the rendered ground truth above a streamed sample, frame by frame."""
    text = encoder.encode([p.text for p in prompts])
    rows = []
    for i, prompt in enumerate(prompts):
        sample = sampler.generate(text[i : i + 1], sampler.noise_plan(seed + i)).clamp(-1, 1)
        truth = render_batch([prompt], num_frames=sampler.num_frames, size=sampler.latent_height, seeds=[seed + i])
        rows += [to_uint8(truth)[0], to_uint8(sample)[0]]  # [F, H, W, 3]
    grid = np.concatenate([np.concatenate(list(r.numpy()), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def pretrain_flow(cfg: Config, args, train_prompts, encoder, generator):
    """Stage one: flow matching from random weights (or --init-from); returns (model, sampler, loss log)."""
    if args.init_from is not None:
        model = CausalWanTransformer3DModel.from_pretrained(str(args.init_from)).train()
    else:
        model = CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).train()
    sampler = StreamingSampler.from_config(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    log = []
    start = time.time()
    bar = tqdm(range(args.steps), desc="pre-training toy generator")
    for step in bar:
        picks = torch.randint(0, len(train_prompts), (args.batch_size,), generator=generator).tolist()
        prompts = [train_prompts[i] for i in picks]
        seeds = torch.randint(0, 2**31 - 1, (args.batch_size,), generator=generator).tolist()
        x_t, timesteps, target, is_target = flow_matching_batch(
            cfg, sampler, prompts, seeds, generator, args.sigma_sampling
        )
        text = encoder.encode([p.text for p in prompts])
        flow = model(x_t, timesteps, text, return_dict=False, frames_per_chunk=cfg.sampler.frames_per_chunk)[0]
        err = (flow - target).square().mean(dim=(1, 3, 4))  # [B, F]
        loss = (err * is_target).sum() / is_target.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append((step, loss.item(), time.time() - start))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval(), sampler, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m learner.pretrain_toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("assets/toy_generator"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="stage one: start from this diffusers-format generator instead of random weights",
    )
    parser.add_argument(
        "--sigma-sampling",
        choices=["sampler", "uniform"],
        default="sampler",
        help="stage one: train at the sampler's sigmas only, or at sigma ~ U(0, 1] (a teacher)",
    )
    parser.add_argument(
        "--distill-from",
        type=Path,
        default=None,
        help="stage two: distil this continuous-time flow model into a noise-dependent few-step one",
    )
    parser.add_argument("--ode-steps", type=int, default=16, help="stage two: Euler steps of the teacher ODE")
    parser.add_argument("--ode-shift", type=float, default=3.0, help="stage two: shift of the ODE's sigma grid")
    parser.add_argument("--pool-size", type=int, default=2048, help="stage two: teacher ODE pairs, computed once")
    parser.add_argument(
        "--first-step-fraction",
        type=float,
        default=0.5,
        help="stage two: share of each batch that trains the first step on ODE pairs",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    encoder = ToyTextEncoder(dim=cfg.model.transformer.text_dim)
    train_prompts, _ = split_prompts(seed=0)
    if args.distill_from is not None:
        model, sampler, log = distill(cfg, args, train_prompts, encoder, generator)
        log_name = "loss.csv"
    else:
        model, sampler, log = pretrain_flow(cfg, args, train_prompts, encoder, generator)
        log_name = "loss.csv"
    start = time.time() - log[-1][2]
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    with open(args.out / log_name, "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss", "seconds"), *log])
    with torch.no_grad():
        save_samples(sampler, encoder, all_prompts()[:: max(1, len(all_prompts()) // 6)][:6], args.out / "samples.png")
    print(f"saved {args.out} after {args.steps} steps, {time.time() - start:.0f} s, final loss {log[-1][1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
