"""Reward-server throughput with batching on vs off, on the tiny real-architecture reward models
(VideoAlign's Qwen2-VL + head, CLIP, the toy rewards), and the share of one toy-world group's wall
time spent in reward scoring.

    python -m bench.rewards --json [--groups 6] [--group-size 4] [--frames 17] [--size 64]

Random weights: the figures measure the pipeline (batching, preprocessing, the models' shapes at
tiny sizes), not the cost of the real 2B model; on a GPU with the real model, batching matters more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import warnings
from pathlib import Path


def _config(root: Path, overrides: list[str]):
    from common.config import load_config
    from rewards.tiny import make_tiny_clip, make_tiny_videoalign

    va, clip = root / "videoalign", root / "clip"
    if not va.exists():
        make_tiny_videoalign(va)
        make_tiny_clip(clip)
    return load_config(
        "configs/toy.yaml",
        [
            f"rewards.models=[{{kind: videoalign, path: {va}, prefix: va_}}, "
            f"{{kind: clip, path: {clip}}}, {{kind: toy}}]",
            *overrides,
        ],
    )


def server_throughput(root: Path, groups: int, group_size: int, frames: int, size: int, batching: bool) -> dict:
    import torch

    from rewards.server import RewardServer

    overrides = (
        ["rewards.max_batch_videos=64", "rewards.batch_timeout_s=0.05"]
        if batching
        else ["rewards.max_batch_videos=1", "rewards.batch_timeout_s=0"]
    )
    cfg = _config(root, overrides + ["rewards.video_fps=16"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = RewardServer(cfg.model_dump(mode="json"))
    from cluster.prompts import load_prompts
    from common.toy.world import render_batch
    from common.video import to_uint8

    prompts, _ = load_prompts(cfg)
    requests = []
    for g in range(groups):
        p = prompts[g % len(prompts)]
        video = to_uint8(render_batch([p], seeds=[g]))  # [1, F, 16, 16, 3]
        video = torch.nn.functional.interpolate(video[0].permute(0, 3, 1, 2).float(), size=(size, size))
        video = video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        video = video[torch.linspace(0, video.shape[0] - 1, frames).round().long()]
        requests.append((video[None].repeat(group_size, 1, 1, 1, 1), [p] * group_size))

    async def run():
        await server.score(*requests[0])  # warm-up (first-call allocations)
        server.latency.clear()
        start = time.perf_counter()
        await asyncio.gather(*[server.score(v, ps) for v, ps in requests])
        return time.perf_counter() - start

    batches_before = server.stats["batches"]
    seconds = asyncio.run(run())
    stats = server.get_stats()
    videos = groups * group_size
    return {
        "batching": batching,
        "videos": videos,
        "seconds": seconds,
        "videos_per_s": videos / seconds,
        "batches": stats["batches"] - batches_before - 1,
        "ms_per_video": {k: v["ms_per_video"] for k, v in stats["models"].items()},
    }


def group_share(root: Path) -> dict:
    """One toy-world group (fork G branches, decode) scored by all models: reward share of wall time."""
    import torch

    from actors.rollout import collect_group
    from cluster.prompts import load_prompts
    from common.dataflow.jobs import make_job
    from common.model.policy import Policy
    from rewards.server import build_reward_models, score_batch

    cfg = _config(root, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = build_reward_models(cfg)
    policy = Policy.from_config(cfg)
    prompts, _ = load_prompts(cfg)
    weights = {t.name: t.weight for t in cfg.rewards.terms}
    a = cfg.algorithm
    reward_seconds = 0.0

    def reward_fn(frames, ps):
        nonlocal reward_seconds
        t0 = time.perf_counter()
        out = score_batch(models, frames, ps, fps=cfg.rewards.video_fps)
        reward_seconds += time.perf_counter() - t0
        return out

    results = []
    for i in range(2):  # the first includes warm-up; report the second
        reward_seconds = 0.0
        job = make_job(cfg.run.seed, "on_policy", i, prompts, cfg.sampler.num_chunks, "on_policy")
        start = time.perf_counter()
        with torch.no_grad():
            collect_group(
                policy.sampler,
                policy.text([job.prompt]),
                job.prompt,
                pivot=job.pivot,
                group_size=a.group_size,
                sigma=a.fork_sigma,
                plan_seed=job.plan_seed,
                fork_seed=job.fork_seed,
                decode=policy.decode,
                reward_fn=reward_fn,
                weights=weights,
                policy_version=0,
                adapter="on_policy",
            )
        wall = time.perf_counter() - start
        results.append(
            {
                "group_size": a.group_size,
                "wall_seconds": wall,
                "reward_seconds": reward_seconds,
                "reward_share": reward_seconds / wall,
            }
        )
    return results[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rewards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--groups", type=int, default=6, help="concurrent requests (one per group)")
    parser.add_argument("--group-size", type=int, default=4, help="videos per request")
    parser.add_argument("--frames", type=int, default=17, help="frames per video (16 fps)")
    parser.add_argument("--size", type=int, default=64, help="frame height = width")
    args = parser.parse_intermixed_args(argv)
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_rewards_") as tmp:
        root = Path(tmp)
        off = server_throughput(root, args.groups, args.group_size, args.frames, args.size, batching=False)
        on = server_throughput(root, args.groups, args.group_size, args.frames, args.size, batching=True)
        share = group_share(root)
    result = {
        "models": ["videoalign (tiny Qwen2-VL)", "clip (tiny)", "toy"],
        "threads": torch.get_num_threads(),
        "batching_off": off,
        "batching_on": on,
        "speedup": on["videos_per_s"] / off["videos_per_s"],
        "group": share,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"batching off: {off['videos_per_s']:.2f} videos/s in {off['batches']} batches")
        print(f"batching on:  {on['videos_per_s']:.2f} videos/s in {on['batches']} batches (x{result['speedup']:.2f})")
        print(
            f"one toy group of {share['group_size']}: {share['wall_seconds']:.2f} s, "
            f"{100 * share['reward_share']:.0f}% in reward scoring"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
