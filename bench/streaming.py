"""Streaming generator benchmark: cache correctness, cache speedup, fork speedup, fork memory, FPS, MFU.

    python -m bench.streaming --json                                    # tiny config, CPU, seconds
    python -m bench.streaming --config configs/self_forcing_wan1.3b.yaml --json   # real size, a GPU

Weights are random (speed and memory do not depend on them) unless a checkpoint is named on the command
line, e.g. model.self_forcing_checkpoint=...; one in the config file (the real config's is a
placeholder) is ignored. The config is read as a model-only one (run.phases=[]): no rewards or prompts
are needed. Timings are medians of --repeats runs after one untimed warm-up each, the workloads
interleaved round by round (and with the GEMM probe), so a machine shared with other work slows them
alike. Figures:
- stream_vs_full_max_abs_err: streamed video with the KV cache vs the same rollout recomputing the
  whole context with a block-causal mask at every step (no cache), max |difference|.
- kv_cache_speedup: time(no-cache rollout) / time(cached rollout), same config and noise.
- fork_speedup: time(G independent rollouts, batched like the branches) / time(one fork into G
  branches), the mean of the ratio over every pivot. fork_cost_model_ratio is what docs/method.md's cost
  model predicts when compute-bound (fork_cost_model_efficiency: the first over the second); on the tiny
  config, CPU time is per-call overhead, not FLOPs, so batching is nearly free and the measured ratio
  stays near 1. fork_speedup_vs_sequential compares with G rollouts run one after another.
  fork_flop_model_ratio is the same prediction from the counted FLOPs (G independent rollouts' over a
  fork's, mean over pivots), fork_flop_model_efficiency the measured speed-up over it: the chunk-pass
  model charges every chunk alike, but a later chunk attends over a longer context, so where
  attention is a large share (the compute-bound toy size) forking saves less than it predicts.
- fork_peak_memory_mb: peak memory of a fork of G branches above the model's own (CUDA: allocator
  peak; CPU: peak resident set growth, sampled).
- stream_fps: decoded-frame rate of one streamed rollout (transformer only: no VAE, no text encoder;
  output frames = 1 + vae_temporal_stride * (latent frames - 1)), first_chunk_latency_s likewise.
- gemm_peak_tflops: the machine's own GEMM rate in the model's dtype at the block's linear shapes
  (tokens x dim x {dim, 3 dim, ffn} and tokens x ffn x dim, tokens = one chunk at batch 1 and at
  sampler.fork_batch_size; nn.Linear's x W^T + b), the fastest shape's median, measured in this
  process between the workloads (gemm_tflops_by_shape: every shape's).
- rollout_mfu, fork_mfu, update_mfu: achieved FLOP/s over gemm_peak_tflops for one streamed rollout,
  one fork of G at pivot `mfu_pivot` (1, or 0 for a one-chunk video; fork_mfu_by_pivot: every pivot)
  and one AR-CoPO update of that group (learner/update.py arcopo_update: the cache rebuild, then
  inner_steps x T steps of forward and backward of num_anchors anchors, with the config's LoRA adapter
  and gradient checkpointing; skipped with --skip-update). FLOPs are counted by
  torch.utils.flop_counter.FlopCounterMode on the warm-up run: matmuls, convolutions and attention
  (the CPU flash-attention kernel included), executed FLOPs (a checkpointed block's recompute counts);
  elementwise work counts nothing, as usual for MFU.
- with --baseline: the same rollout and fork also run with the concatenating KV cache (every forward
  concatenates the cached chunks, the pre-fork prefix expanded to the branches' batch: what the
  sampler did before its caches were preallocated), interleaved, as *_concatenating figures.
- attention_backend, attention_kernels: model.attention_backend (or diffusers' default) and the
  attention operators that ran in one first-chunk forward (which kernel SDPA chose).
- with --profile: where the time goes in one rollout and one fork (torch.profiler; self time by kind
  of operator: gemm, attention, concat (the KV concatenation, and rope's and the outputs'), copy_cast,
  elementwise_other), as fractions.
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
from common.model.loading import compile_blocks, load_policy
from common.model.sampler import StreamingSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _time(fn, device: torch.device) -> float:
    return _timed(fn, device)[0]


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


# -- the machine's GEMM rate and the FLOPs of a workload ------------------------------------------


class GemmProbe:
    """The GEMM rate of this machine at a transformer block's linear shapes, in the model's dtype.

    `round()` times every shape once (the first call also warms up); `result()` gives every shape's
    median rate and the fastest shape's as the peak. Interleave rounds with the workloads they are
    the denominator of, so that both see the same machine."""

    def __init__(self, transformer, tokens: list[int], dtype: torch.dtype, device: torch.device):
        dim = transformer.num_attention_heads * transformer.attention_head_dim
        ffn = transformer.ffn_dim
        shapes = [(m, dim, n) for m in sorted(set(tokens)) for n in (dim, 3 * dim, ffn)]
        shapes += [(m, ffn, dim) for m in sorted(set(tokens))]
        gen = torch.Generator().manual_seed(0)
        self.device = device
        self.cases = []
        for m, k, n in shapes:
            x, w, b = (torch.randn(s, generator=gen).to(device, dtype) for s in ((m, k), (n, k), (n,)))
            self.cases.append(((m, k, n), x, w, b))
        self.times: dict[tuple[int, int, int], list[float]] = {shape: [] for shape, *_ in self.cases}
        self._warm = False

    def round(self) -> None:
        for shape, x, w, b in self.cases:
            if not self._warm:
                torch.nn.functional.linear(x, w, b)
            self.times[shape].append(_time(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), self.device))
        self._warm = True

    def result(self) -> dict:
        rates = {
            "x".join(map(str, shape)): 2 * shape[0] * shape[1] * shape[2] / statistics.median(t) / 1e12
            for shape, t in self.times.items()
        }
        return {"gemm_peak_tflops": max(rates.values()), "gemm_tflops_by_shape": rates}


def gemm_peak(transformer, tokens: list[int], dtype: torch.dtype, device: torch.device, repeats: int = 3) -> dict:
    """`GemmProbe`'s result after `repeats` rounds: for callers that time nothing else here."""
    probe = GemmProbe(transformer, tokens, dtype, device)
    for _ in range(repeats):
        probe.round()
    return probe.result()


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs, result) of `fn()`: FlopCounterMode's matmuls, convolutions and attention, with the
    CPU flash-attention kernel (which FlopCounterMode does not know) counted like the CUDA ones."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        result = fn()
    return counter.get_total_flops(), result


# -- where the time goes ---------------------------------------------------------------------------

_KINDS = (
    ("gemm", ("addmm", "aten::mm", "bmm", "baddbmm", "matmul", "linear", "convolution")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("concat", ("aten::cat",)),
    ("copy_cast", ("aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone")),
)


def _profiled_operators(fn, device: torch.device):
    """torch.profiler's per-operator averages over one `fn()` (the device's kernels too on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    return prof.key_averages()


def time_breakdown(fn, device: torch.device) -> dict:
    """Fractions of the self time of the leaf operators of one `fn()`, by kind (torch.profiler)."""
    totals: dict[str, float] = {kind: 0.0 for kind, _ in _KINDS} | {"elementwise_other": 0.0}
    for event in _profiled_operators(fn, device):
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if own <= 0 or (device.type != "cuda" and not event.key.startswith("aten::")):
            continue
        kind = next((k for k, names in _KINDS if any(n in event.key for n in names)), "elementwise_other")
        totals[kind] += own
    total = sum(totals.values()) or 1.0
    return {kind: round(t / total, 4) for kind, t in totals.items()}


def attention_kernels(fn, device: torch.device) -> list[str]:
    """The attention operators that ran in one `fn()` (which kernel SDPA or the configured backend chose)."""
    names = dict(_KINDS)["attention"]
    events = _profiled_operators(fn, device)
    return sorted({e.key for e in events if e.key.startswith("aten::") and any(n in e.key for n in names)})


# -- the benchmark ----------------------------------------------------------------------------------


def _update_workload(cfg: Config, model, sampler: StreamingSampler, text: torch.Tensor, group):
    """One AR-CoPO update of one group, as a learner runs it: the config's LoRA adapter trained in
    float32 on the base, gradient checkpointing as configured, AdamW, UpdateSettings.from_config."""
    from common.model import adapters
    from learner.update import UpdateSettings, arcopo_update

    lora = cfg.learner.lora
    adapters.add_adapters(model, lora.rank, lora.alpha, lora.target_modules)
    params = adapters.train_adapter(model, adapters.ON_POLICY)
    if cfg.learner.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=cfg.learner.lr)
    settings = UpdateSettings.from_config(cfg)
    rewards = torch.randn(group.group_size, generator=torch.Generator().manual_seed(0))

    def update():
        gen = torch.Generator().manual_seed(0)
        return arcopo_update(sampler, [group], [rewards], [text], params, optimizer, settings, gen)

    return update


def run(
    cfg: Config,
    config_path: str,
    repeats: int,
    skip_no_cache: bool,
    *,
    skip_update: bool = False,
    baseline: bool = False,
    profile: bool = False,
) -> dict:
    device = torch.device(cfg.model.device)
    # Built eager: FLOPs are counted on the eager warm-up runs, then the blocks are compiled if asked.
    model = load_policy(cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": False})}))
    sampler = StreamingSampler.from_config(model, cfg)
    concatenating = StreamingSampler.from_config(model, cfg)
    concatenating.preallocate_cache = False
    group_size = cfg.algorithm.group_size
    text = torch.randn(1, cfg.model.max_text_tokens, cfg.model.transformer.text_dim, device=device)
    plan = sampler.noise_plan(cfg.run.seed)
    independent = sampler.noise_plan(*range(cfg.run.seed, cfg.run.seed + group_size))
    L = sampler.num_chunks
    mfu_pivot = min(1, L - 1)

    def fork(pivot: int, s: StreamingSampler = sampler):
        return s.fork(text, plan, pivot=pivot, group_size=group_size, sigma=cfg.algorithm.fork_sigma, fork_seed=1)

    workloads = {
        "stream": lambda: sampler.generate(text, plan),
        "first_chunk": lambda: next(iter(sampler.stream(text, plan))),
        "independent": lambda: sampler.generate(text, independent),
        **{f"fork{p}": (lambda p=p: fork(p)) for p in range(L)},
    }
    if baseline:
        workloads["stream_concatenating"] = lambda: concatenating.generate(text, plan)
        workloads["fork_concatenating"] = lambda: fork(mfu_pivot, concatenating)

    # Warm-up runs (allocator, kernels, lazy init), which are also where FLOPs are counted.
    flops, outputs = {}, {}
    for name, fn in workloads.items():
        flops[name], outputs[name] = count_flops(fn)
    if cfg.model.compile:
        compile_blocks(model)
        for fn in workloads.values():
            fn()  # compiles every specialisation before anything is timed

    chunk_tokens = sampler.frames_per_chunk * model.tokens_per_frame(sampler.latent_height, sampler.latent_width)
    probe = GemmProbe(
        cfg.model.transformer, [chunk_tokens, cfg.sampler.fork_batch_size * chunk_tokens], model.compute_dtype, device
    )
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        probe.round()
        for name, fn in workloads.items():
            times[name].append(_time(fn, device))
    probe.round()
    seconds = {name: statistics.median(t) for name, t in times.items()}
    peak = probe.result()
    peak_flops = peak["gemm_peak_tflops"] * 1e12

    result: dict[str, object] = {}
    stream_s, video = seconds["stream"], outputs["stream"]
    if not skip_no_cache:
        no_cache_s, reference = _timed(lambda: sampler.generate(text, plan, use_cache=False), device)
        result["stream_vs_full_max_abs_err"] = (video.float() - reference.float()).abs().max().item()
        result["kv_cache_speedup"] = no_cache_s / stream_s
        result["no_cache_rollout_s"] = no_cache_s

    fork_times = [seconds[f"fork{p}"] for p in range(L)]
    # Chunk-passes weighted by batch, docs/method.md section 6: a fork runs the prefix once for all G.
    cost_ratios = [group_size * L / (p + group_size * (L - p)) for p in range(L)]
    # The same prediction from the counted FLOPs: it also charges later chunks their longer attention
    # context, which the chunk-pass model treats as free (what it misses where attention dominates).
    flop_ratios = [flops["independent"] / flops[f"fork{p}"] for p in range(L)]
    fork_memory = peak_memory_mb(lambda: fork(0), device)

    latent_frames = sampler.num_frames
    output_frames = 1 + cfg.model.vae_temporal_stride * (latent_frames - 1)
    fork_speedup = statistics.mean(seconds["independent"] / t for t in fork_times)
    result.update(
        config=config_path,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        dtype=cfg.model.dtype,
        compiled=cfg.model.compile,
        group_size=group_size,
        fork_batch_size=cfg.sampler.fork_batch_size,
        latent_shape=[cfg.model.transformer.in_channels, latent_frames, *cfg.latent_shape[1:]],
        repeats=repeats,
        stream_rollout_s=stream_s,
        stream_fps=output_frames / stream_s,
        first_chunk_latency_s=seconds["first_chunk"],
        independent_rollouts_s=seconds["independent"],
        fork_s_by_pivot=fork_times,
        fork_speedup=fork_speedup,
        fork_speedup_vs_sequential=statistics.mean(group_size * stream_s / t for t in fork_times),
        fork_cost_model_ratio=statistics.mean(cost_ratios),
        fork_cost_model_efficiency=fork_speedup / statistics.mean(cost_ratios),
        fork_flop_model_ratio=statistics.mean(flop_ratios),
        fork_flop_model_efficiency=fork_speedup / statistics.mean(flop_ratios),
        fork_peak_memory_mb=fork_memory,
        attention_backend=cfg.model.attention_backend or "native (diffusers' default: torch SDPA chooses)",
        attention_kernels=attention_kernels(workloads["first_chunk"], device),
        **peak,
        mfu_pivot=mfu_pivot,
        rollout_gflop=flops["stream"] / 1e9,
        fork_gflop=flops[f"fork{mfu_pivot}"] / 1e9,
        rollout_tflops=flops["stream"] / stream_s / 1e12,
        fork_tflops=flops[f"fork{mfu_pivot}"] / seconds[f"fork{mfu_pivot}"] / 1e12,
        rollout_mfu=flops["stream"] / stream_s / peak_flops,
        fork_mfu=flops[f"fork{mfu_pivot}"] / seconds[f"fork{mfu_pivot}"] / peak_flops,
        fork_mfu_by_pivot=[flops[f"fork{p}"] / seconds[f"fork{p}"] / peak_flops for p in range(L)],
        independent_rollouts_mfu=flops["independent"] / seconds["independent"] / peak_flops,
    )
    if baseline:
        result.update(
            stream_rollout_s_concatenating=seconds["stream_concatenating"],
            fork_s_concatenating=seconds["fork_concatenating"],
            rollout_mfu_concatenating=flops["stream_concatenating"] / seconds["stream_concatenating"] / peak_flops,
            fork_mfu_concatenating=flops["fork_concatenating"] / seconds["fork_concatenating"] / peak_flops,
        )
    if profile:
        result["time_breakdown"] = {
            "rollout": time_breakdown(workloads["stream"], device),
            f"fork_pivot{mfu_pivot}": time_breakdown(workloads[f"fork{mfu_pivot}"], device),
        }
        if baseline:
            result["time_breakdown"]["fork_concatenating"] = time_breakdown(workloads["fork_concatenating"], device)
    if not skip_update:
        update = _update_workload(cfg, model, sampler, text, outputs[f"fork{mfu_pivot}"])
        update_flops, _ = count_flops(update)  # also the warm-up
        update_times = []
        for _ in range(repeats):
            probe.round()
            update_times.append(_time(update, device))
        update_s = statistics.median(update_times)
        update_peak = probe.result()["gemm_peak_tflops"] * 1e12  # with the rounds taken around the updates too
        result.update(
            update_s=update_s,
            update_gflop=update_flops / 1e9,
            update_tflops=update_flops / update_s / 1e12,
            update_mfu=update_flops / update_s / update_peak,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streaming", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="config YAML (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up; the median counts")
    parser.add_argument(
        "--skip-no-cache",
        action="store_true",
        help="skip the no-cache baseline (slow at real size: it is quadratic in chunks)",
    )
    parser.add_argument("--skip-update", action="store_true", help="skip the learner update (update_mfu)")
    parser.add_argument(
        "--baseline", action="store_true", help="also time the concatenating KV cache (the *_concatenating figures)"
    )
    parser.add_argument("--profile", action="store_true", help="also report where the time goes (time_breakdown)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampler.num_chunks=8")
    args = parser.parse_intermixed_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    # Before the user's overrides, so a checkpoint named on the command line still loads. A model-only
    # config: no phases, so the real config's reward and prompt placeholders are not needed.
    model_only = ["model.self_forcing_checkpoint=null", "model.diffusers_transformer=null", "run.phases=[]"]
    cfg = load_config_for_cli(args.config, [*model_only, *args.overrides])
    if cfg is None:
        return 2
    result = run(
        cfg,
        args.config,
        args.repeats,
        args.skip_no_cache,
        skip_update=args.skip_update,
        baseline=args.baseline,
        profile=args.profile,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
