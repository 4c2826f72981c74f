"""Streaming generator benchmark: cache correctness, cache speedup, fork speedup, fork memory, FPS.

    python -m bench.streaming --json                                    # tiny config, CPU, seconds
    python -m bench.streaming --config configs/self_forcing_wan1.3b.yaml --json   # real size, a GPU

Weights are random (speed and memory do not depend on them) unless a checkpoint is named on the command
line, e.g. model.self_forcing_checkpoint=...; one in the config file (the real config's is a
placeholder) is ignored. Figures:
- stream_vs_full_max_abs_err: streamed video with the KV cache vs the same rollout recomputing the
  whole context with a block-causal mask at every step (no cache), max |difference|.
- kv_cache_speedup: time(no-cache rollout) / time(cached rollout), same config and noise.
- fork_speedup: time(G independent rollouts, batched like the branches) / time(one fork into G
  branches), the mean of the ratio over every pivot. fork_cost_model_ratio is what docs/method.md's cost
  model predicts when compute-bound; on the tiny config, CPU time is per-call overhead, not FLOPs,
  so batching is nearly free and the measured ratio stays near 1. fork_speedup_vs_sequential
  compares with G rollouts run one after another.
- fork_peak_memory_mb: peak memory of a fork of G branches above the model's own (CUDA: allocator
  peak; CPU: peak resident set growth, sampled).
- stream_fps: decoded-frame rate of one streamed rollout (transformer only: no VAE, no text encoder;
  output frames = 1 + vae_temporal_stride * (latent frames - 1)), first_chunk_latency_s likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from common.config import Config, load_config_for_cli
from common.model.loading import load_policy
from common.model.sampler import StreamingSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> tuple[float, object]:
    result = None
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


class _PeakRSS:
    """Samples this process's resident set size in a thread; CPU has no allocator peak counter."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def peak_memory_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _PeakRSS() as probe:
        fn()
    return probe.growth_mb


def run(cfg: Config, config_path: str, repeats: int, skip_no_cache: bool) -> dict:
    device = torch.device(cfg.model.device)
    model = load_policy(cfg)  # random weights unless the command line names a checkpoint
    sampler = StreamingSampler.from_config(model, cfg)
    group_size = cfg.algorithm.group_size
    text = torch.randn(1, cfg.model.max_text_tokens, cfg.model.transformer.text_dim, device=device)
    plan = sampler.noise_plan(cfg.run.seed)

    sampler.generate(text, plan)  # warm-up: allocator, kernels, lazy init
    stream_s, video = _timed(lambda: sampler.generate(text, plan), device, repeats)

    def first_chunk():
        return next(iter(sampler.stream(text, plan)))

    first_chunk_s, _ = _timed(first_chunk, device, repeats)

    result: dict[str, object] = {}
    if not skip_no_cache:
        no_cache_s, reference = _timed(lambda: sampler.generate(text, plan, use_cache=False), device, 1)
        result["stream_vs_full_max_abs_err"] = (video.float() - reference.float()).abs().max().item()
        result["kv_cache_speedup"] = no_cache_s / stream_s
        result["no_cache_rollout_s"] = no_cache_s

    independent = sampler.noise_plan(*range(cfg.run.seed, cfg.run.seed + group_size))
    independent_s, _ = _timed(lambda: sampler.generate(text, independent), device, repeats)
    fork_times = []
    for pivot in range(sampler.num_chunks):
        t, _ = _timed(
            lambda pivot=pivot: sampler.fork(
                text,
                plan,
                pivot=pivot,
                group_size=group_size,
                sigma=cfg.algorithm.fork_sigma,
                fork_seed=1,
            ),
            device,
            repeats,
        )
        fork_times.append(t)
    # Chunk-passes weighted by batch, docs/method.md section 6: a fork runs the prefix once for all G.
    L = sampler.num_chunks
    cost_ratios = [group_size * L / (p + group_size * (L - p)) for p in range(L)]
    fork_memory = peak_memory_mb(
        lambda: sampler.fork(text, plan, pivot=0, group_size=group_size, sigma=cfg.algorithm.fork_sigma, fork_seed=1),
        device,
    )

    latent_frames = sampler.num_frames
    output_frames = 1 + cfg.model.vae_temporal_stride * (latent_frames - 1)
    result.update(
        config=config_path,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype=cfg.model.dtype,
        group_size=group_size,
        fork_batch_size=cfg.sampler.fork_batch_size,
        latent_shape=[cfg.model.transformer.in_channels, latent_frames, *cfg.latent_shape[1:]],
        stream_rollout_s=stream_s,
        stream_fps=output_frames / stream_s,
        first_chunk_latency_s=first_chunk_s,
        independent_rollouts_s=independent_s,
        fork_s_by_pivot=fork_times,
        fork_speedup=statistics.mean(independent_s / t for t in fork_times),
        fork_speedup_vs_sequential=statistics.mean(group_size * stream_s / t for t in fork_times),
        fork_cost_model_ratio=statistics.mean(cost_ratios),
        fork_peak_memory_mb=fork_memory,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streaming", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="config YAML (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    parser.add_argument(
        "--skip-no-cache",
        action="store_true",
        help="skip the no-cache baseline (slow at real size: it is quadratic in chunks)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampler.num_chunks=8")
    args = parser.parse_intermixed_args(argv)
    # Before the user's overrides, so a checkpoint named on the command line still loads.
    random_weights = ["model.self_forcing_checkpoint=null", "model.diffusers_transformer=null"]
    cfg = load_config_for_cli(args.config, [*random_weights, *args.overrides])
    if cfg is None:
        return 2
    result = run(cfg, args.config, args.repeats, args.skip_no_cache)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
