"""Pre-train the toy world's causal generator, so nobody has to: its output is committed.

The simple way, not a distillation: flow matching on one chunk at a time given the clean earlier
chunks, through the same block-causal mask the streaming sampler reproduces with its cache. Each
sample picks a target chunk j; chunks before j enter clean at timestep 0 (exactly what the context
pass writes at sampling time), chunk j enters noised to one of the sampler's own sigmas, and chunks
after j cannot influence chunk j through the causal mask, so they ride along unused. Training at
the sampler's few sigmas only is what makes a 4-step sampler usable without distillation.

    python -m learner.pretrain_toy --config configs/toy.yaml --steps 3000 --out assets/toy_generator

writes a diffusers-format transformer directory plus `samples.png` (prompts vs streamed samples)
and `loss.csv`.

A flow-matching model's first step (sigma = 1) predicts the conditional MEAN of the chunk, whatever
the noise, so its few-step samples barely depend on the initial noise, and AR-CoPO, which explores
through exactly that noise, gets no signal (measured: branches of a fork differed by 1e-4 per pixel).
Self-Forcing's generator is distilled, and its few steps map noise to distinct samples. Stage two
does the simplest such distillation:

    python -m learner.pretrain_toy --distill-from assets/toy_generator --steps 600 --out assets/toy_generator

integrates the flow model's probability-flow ODE (`--ode-steps` Euler steps) from noise e for one
chunk given clean earlier chunks, and trains a copy to predict that endpoint x0*(e) from e at the
first sigma and from (1 - s) x0* + s n at the later sigmas: noise in, a noise-dependent sample out.

Status: EXPERIMENTAL, not used by the committed generator. 200 steps raised the first step's
spread across noises 4.5x (0.015 -> 0.070 per pixel), but the later steps, fed 6% of that
prediction under 94% shared solver noise, wash it out again (final branch spread 8e-5 per pixel).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.causal_wan import CausalWanTransformer3DModel
from common.config import load_config_for_cli
from common.sampler import StreamingSampler
from common.toy_world import ToyTextEncoder, all_prompts, render_batch, split_prompts, to_uint8


def flow_matching_batch(cfg, sampler, prompts, seeds, generator):
    """Model input, per-frame timesteps, the flow target and a mask of the frames that count."""
    s, sched = cfg.sampler, sampler.scheduler
    videos = render_batch(prompts, num_frames=s.num_frames, size=s.height, seeds=seeds)  # [B, 3, F, H, W]
    batch, f = videos.shape[0], s.frames_per_chunk
    target_chunk = torch.randint(0, s.num_chunks, (batch,), generator=generator)
    step = torch.randint(0, sched.num_steps, (batch,), generator=generator)
    sigma = torch.tensor(sched.sigmas)[step]
    noise = torch.randn(videos.shape, generator=generator)
    frame_chunk = torch.arange(s.num_frames) // f  # [F]
    is_target = frame_chunk[None] == target_chunk[:, None]  # [B, F]
    frame_sigma = torch.where(is_target, sigma[:, None], torch.zeros(()))  # clean context: sigma 0
    sig = frame_sigma[:, None, :, None, None]
    x_t = (1 - sig) * videos + sig * noise
    timesteps = frame_sigma * sched.num_train_timesteps
    return x_t, timesteps, noise - videos, is_target


def ode_endpoints(teacher, sampler, text, context, noise, ode_steps: int) -> torch.Tensor:
    """x0*(noise) for the chunk after `context` (clean frames [B, C, start, H, W]): Euler steps along
    the teacher's probability-flow ODE, in full-sequence mode with the clean context at timestep 0."""
    sched, f = sampler.scheduler, sampler.frames_per_chunk
    start = context.shape[2]
    sigmas = [sched.warp(sched.num_train_timesteps * (1 - i / ode_steps)) for i in range(ode_steps)] + [0.0]
    x = noise
    with torch.no_grad():
        for sig, nxt in zip(sigmas, sigmas[1:]):
            t = torch.zeros(x.shape[0], start + f)
            t[:, start:] = sig * sched.num_train_timesteps
            flow = teacher(torch.cat([context, x], dim=2), t, text, frames_per_chunk=f)[:, :, start:]
            x = x + (nxt - sig) * flow
    return x


def distill(cfg, args, train_prompts, encoder, generator) -> list[tuple]:
    """Stage two (see the module docstring): returns the loss log; trains a copy of --distill-from."""
    teacher = CausalWanTransformer3DModel.from_pretrained(str(args.distill_from)).eval().requires_grad_(False)
    student = CausalWanTransformer3DModel.from_pretrained(str(args.distill_from)).train()
    sampler = StreamingSampler.from_config(student, cfg)
    sched, s = sampler.scheduler, cfg.sampler
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    log, start_time = [], time.time()
    bar = tqdm(range(args.steps), desc="distilling toy generator")
    for step in bar:
        picks = torch.randint(0, len(train_prompts), (args.batch_size,), generator=generator).tolist()
        prompts = [train_prompts[i] for i in picks]
        seeds = torch.randint(0, 2**31 - 1, (args.batch_size,), generator=generator).tolist()
        videos = render_batch(prompts, num_frames=s.num_frames, size=s.height, seeds=seeds)
        text = encoder.encode([p.text for p in prompts])
        chunk = int(torch.randint(0, s.num_chunks, (1,), generator=generator))  # one per batch: same length
        context = videos[:, :, : chunk * s.frames_per_chunk]
        noise = torch.randn((args.batch_size, *sampler.chunk_shape), generator=generator)
        target = ode_endpoints(teacher, sampler, text, context, noise, args.ode_steps)
        # Step 0 sees the ODE's own noise; later steps see the endpoint re-noised with fresh noise,
        # exactly what the consistency sampler feeds them.
        step_idx = torch.randint(0, sched.num_steps, (args.batch_size,), generator=generator)
        sigma = torch.tensor(sched.sigmas)[step_idx][:, None, None, None, None]
        fresh = torch.randn(target.shape, generator=generator)
        x_t = torch.where(step_idx[:, None, None, None, None] == 0, noise, (1 - sigma) * target + sigma * fresh)
        t = torch.zeros(args.batch_size, context.shape[2] + s.frames_per_chunk)
        t[:, context.shape[2]:] = sigma.flatten()[:, None] * sched.num_train_timesteps
        flow = student(torch.cat([context, x_t], dim=2), t, text, frames_per_chunk=s.frames_per_chunk)
        x0 = x_t - sigma * flow[:, :, context.shape[2]:]
        loss = (x0 - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
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


def pretrain_flow(cfg, args, train_prompts, encoder, generator):
    """Stage one: flow matching from random weights; returns (model, sampler, loss log)."""
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
        x_t, timesteps, target, is_target = flow_matching_batch(cfg, sampler, prompts, seeds, generator)
        text = encoder.encode([p.text for p in prompts])
        flow = model(x_t, timesteps, text, frames_per_chunk=cfg.sampler.frames_per_chunk)
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
    parser = argparse.ArgumentParser(prog="python -m learner.pretrain_toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("assets/toy_generator"))
    parser.add_argument("--distill-from", type=Path, default=None,
                        help="stage two: distil this flow-matching generator into a noise-dependent few-step one")
    parser.add_argument("--ode-steps", type=int, default=8, help="Euler steps of the teacher ODE (stage two)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    encoder = ToyTextEncoder(dim=cfg.model.transformer.text_dim)
    train_prompts, _ = split_prompts(seed=0)
    if args.distill_from is not None:
        model, sampler, log = distill(cfg, args, train_prompts, encoder, generator)
        log_name = "distill_loss.csv"
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
