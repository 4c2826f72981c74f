"""The whole distributed job with the real architectures at full size, random weights, on CPU.

    python -m bench.real_size --json                 # Self-Forcing 1.3B (30 blocks) + VideoAlign on Qwen2-VL-2B
    python -m bench.real_size --json --layers 2 --reward tiny   # real width, 2 blocks (tests/test_bench_real_size.py)
    python -m bench.real_size --json --keep          # keep the weight files (GBs) under --root

What runs: `cluster.train.run` on configs/self_forcing_wan1.3b.yaml (local Ray, embedded Redis; phases
reference, semi, on_policy, merge), with every model file written first, with seeded random weights,
in the layout the real job reads:
- the generator: Self-Forcing's causal Wan2.1-T2V-1.3B (30 blocks of 1536 = 12 heads x 128, FFN 8960,
  text dim 4096), written as Self-Forcing's DMD checkpoint ({generator_ema: {model.<Wan key>: tensor}},
  common.model.loading.save_self_forcing_checkpoint) in bfloat16 and read by the real loader
  (model.self_forcing_checkpoint). Never built in memory to write it: parameters on the meta device,
  each filled in bfloat16 (rewards.tiny.random_tensor: std 1/sqrt(fan_in), norms one);
- the Wan2.1 VAE: diffusers' AutoencoderKLWan() (its default config is Wan2.1's), a diffusers vae/ dir;
- VideoAlign at Qwen2-VL-2B-Instruct's size (rewards.tiny.make_tiny_videoalign(size="2b"): VideoReward's
  on-disk layout, 2.2B parameters in bfloat16), `--reward tiny` for a tiny one;
- the out-of-domain scorer: CLIP ViT-L/14 (rewards.tiny.make_tiny_clip(size="vit-l-14"), 428M
  parameters; a tiny CLIP with `--reward tiny`), scoring `clip_score` on 1 held-out prompt x 1 seed
  (run.out_of_domain), so the merge's dual-improvement rule has both of its scores;
- the text encoder: REDUCED. UMT5-XXL (5.7B parameters) cannot be built on this machine; a UMT5 of the
  real width (d_model 4096, 64 heads x 64, gated-GELU FFN 10240) with 2 layers instead of 24 and a
  word-level vocabulary of the prompt file's words instead of 256k sentencepiece pieces. Its embeddings
  have the real shape [512, 4096]; the job encodes the prompts once into its prompt-embedding file.
The weights are written in a child process, so the driver's peak memory is the job's own.

The job: 64x64 pixels (8x8 latents), 3 chunks of 3 latent frames (9 latent, 33 pixel frames), G = 12,
B = 4 anchors, LoRA rank 64 / alpha 128 (float32 master weights on the bfloat16 base), gradient
checkpointing, 2 reference groups, 1 semi update and 2 on-policy updates of 1 group each, evaluation
on 1 prompt x 1 seed, merge sweep s in {0, 1}. VideoAlign scores 64x64 clips at 56x56 (min_pixels =
max_pixels = 3136: 4 video tokens per frame pair) with a short prompt template (the built-in one is
~400 tokens with the stand-in tokenizer, which made one group's scoring take 3 minutes on one core).
Roles: 1 rollout worker, 1 reward server, 1 learner. They take turns: the one rollout worker waits for
its scores, and with learner.max_staleness 0 no rollout runs while the learner trains. So by default
(--threads 2) each role gets 2 CPUs of a 6-CPU local Ray and 2 torch threads, and the 2 cores are busy
with one role at a time; --threads 1 keeps Ray's accounting within 2 CPUs (0.5 / 0.5 / 1, one thread
each, as configs/toy.yaml shares a laptop), which is slower.

Prints one JSON object (logs go to stderr): finished, dtype, lora_dtype, params_billion, groups,
on_policy_updates, adapter_update_norm (per adapter: the saved final tensors against the first
checkpoint's, written before any update), peak_rss_gb per role (rollout, reward, learner, driver; each
actor's ru_maxrss), seconds per phase (from metrics.jsonl time stamps), weight_sync (bytes and seconds of
each broadcast after an update), record_bytes per group, checkpoint_bytes, gemm_peak_tflops (the machine's
GEMM rate at the generator's shapes, bench.streaming's MFU denominator), and the shapes run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.real_size")

CONFIG = "configs/self_forcing_wan1.3b.yaml"
MARKER = ".bench_real_size"  # --root is only ever cleared when this file says the bench made it
PROMPTS = [
    "a red fox running through fresh snow at dawn",
    "a sailboat crossing a calm bay under a pink sky",
    "a cat jumping onto a wooden table in a sunny kitchen",
    "rain falling on a neon-lit city street at night",
]
# The out-of-domain scorer's size for each --reward: the real CLIP ViT-L/14 beside the 2B VideoAlign.
CLIP_SIZE = {"2b": "vit-l-14", "tiny": "tiny"}
# Held out (never trained on): the out-of-domain score's prompts, scored by CLIP ViT-L/14.
HELDOUT_PROMPTS = ["a hot air balloon drifting over green hills", "waves breaking on a rocky shore at sunset"]
REWARD_TEMPLATE = (
    "Rate this AI-generated video. Textual prompt - {text_prompt}\n"
    "Visual Quality: <|VQ_reward|>\nMotion Quality: <|MQ_reward|>\nText Alignment: <|TA_reward|>\n"
)
HEIGHT = WIDTH = 64
NUM_CHUNKS, FRAMES_PER_CHUNK = 3, 3
REWARD_PIXELS = 56 * 56
UMT5 = dict(
    d_model=4096,
    d_kv=64,
    num_heads=64,
    d_ff=10240,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Model files (run in a child process)
# ---------------------------------------------------------------------------------------------


def write_transformer(path: Path, kwargs: dict, seed: int) -> int:
    """Self-Forcing's checkpoint layout, bfloat16, from meta shapes; returns the parameter count."""
    import torch

    from common.model.causal_wan import CausalWanTransformer3DModel
    from common.model.loading import original_key_map, parameters_on_meta, save_self_forcing_checkpoint
    from rewards.tiny import random_tensor

    with parameters_on_meta():
        model = CausalWanTransformer3DModel(**kwargs)
    original = original_key_map(model)  # initialised by what each tensor is in Wan's own names
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(original[k], shapes[k], generator, torch.bfloat16) for k in sorted(shapes)}
    model.load_state_dict(state, assign=True)
    save_self_forcing_checkpoint(model, path)
    return sum(v.numel() for v in state.values())


def write_vae(directory: Path, seed: int) -> int:
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan().to(torch.bfloat16)  # diffusers' defaults are the Wan2.1 VAE's config
    vae.save_pretrained(str(directory))
    return sum(p.numel() for p in vae.parameters())


def write_text_encoder(root: Path, prompts: list[str], seed: int) -> int:
    """A reduced UMT5 (see the module docstring) and a word-level tokenizer of the prompts' words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    split = pre_tokenizers.Whitespace()
    words = sorted({w for p in prompts for w, _ in split.pre_tokenize_str(p)})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **UMT5)
    model = UMT5EncoderModel._from_config(config, dtype=torch.bfloat16)  # 0.8 GB: no need for meta here
    model.save_pretrained(str(root / "text_encoder"))
    return sum(p.numel() for p in model.parameters())


def count_checkpoint(path: Path) -> int:
    """Parameters in a torch state-dict file, counting shared storages (tied weights) once."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    seen, total = set(), 0
    for value in state.values():
        ptr = value.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += value.numel()
    return total


def write_weights(out: str, layers: int, reward: str, seed: int, manifest: str) -> None:
    """Every model file the job reads, into `out`; counts and sizes into `manifest` (JSON)."""
    import torch

    from common.config import load_config
    from common.metrics import peak_rss_bytes
    from rewards.tiny import make_tiny_clip, make_tiny_videoalign

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kwargs = load_config(CONFIG, [f"model.transformer.num_layers={layers}"]).model.transformer.kwargs()
    counts, seconds = {}, {}
    steps = [
        ("transformer", lambda: write_transformer(out / "self_forcing_dmd.pt", kwargs, seed)),
        ("vae", lambda: write_vae(out / "vae", seed)),
        ("text_encoder", lambda: write_text_encoder(out, PROMPTS, seed)),
        (
            "reward",
            lambda: count_checkpoint(
                make_tiny_videoalign(out / "videoalign", size=reward, seed=seed) / "checkpoint-11352" / "model.pth"
            ),
        ),
        ("clip", lambda: count_safetensors(make_tiny_clip(out / "clip", seed=seed, size=CLIP_SIZE[reward]))),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        counts[name] = step()
        seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("wrote %s: %.3fB parameters in %.1f s", name, counts[name] / 1e9, seconds[name])
    (out / "videoalign" / "prompt_template.txt").write_text(REWARD_TEMPLATE)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (out / "heldout.txt").write_text("\n".join(HELDOUT_PROMPTS) + "\n")
    sizes = {
        "transformer": (out / "self_forcing_dmd.pt").stat().st_size,
        "vae": _tree_bytes(out / "vae"),
        "text_encoder": _tree_bytes(out / "text_encoder"),
        "reward": _tree_bytes(out / "videoalign"),
        "clip": _tree_bytes(out / "clip"),
    }
    Path(manifest).write_text(
        json.dumps(
            {
                "params": counts,
                "file_bytes": sizes,
                "seconds": seconds,
                "total_seconds": time.perf_counter() - start,
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
    )


def count_safetensors(directory: Path) -> int:
    """Parameters in a model directory's safetensors files, read from their headers only."""
    import math

    from safetensors import safe_open

    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def job_overrides(weights: Path, root: Path, layers: int, threads: int, sample_prompts: int) -> list[str]:
    if threads == 1:  # 2 CPUs in all, as configs/toy.yaml shares a laptop: one torch thread a role
        cpus, total = {"rollout": 0.5, "rewards": 0.5, "learner": 1.0}, 2
    else:
        cpus, total = {"rollout": threads, "rewards": threads, "learner": threads}, 3 * threads
    reward = {
        "kind": "videoalign",
        "path": str(weights / "videoalign"),
        "base_model": str(weights / "videoalign" / "base"),
        "prompt_template": str(weights / "videoalign" / "prompt_template.txt"),
        "device": "cpu",
        "dtype": "bfloat16",
        "num_gpus": 0,
        "min_pixels": REWARD_PIXELS,
        "max_pixels": REWARD_PIXELS,
    }
    # The out-of-domain scorer: CLIP's text-video score on the held-out prompts (run.out_of_domain).
    clip = {"kind": "clip", "path": str(weights / "clip"), "device": "cpu", "dtype": "bfloat16", "num_frames": 2}
    return [
        f"model.transformer.num_layers={layers}",
        f"model.self_forcing_checkpoint={weights / 'self_forcing_dmd.pt'}",
        "model.checkpoint_key=generator_ema",
        f"model.vae={weights / 'vae'}",
        f"model.text_encoder={weights / 'text_encoder'}",
        f"model.tokenizer={weights / 'tokenizer'}",
        "model.dtype=bfloat16",
        "model.device=cpu",
        f"sampler.num_chunks={NUM_CHUNKS}",
        f"sampler.frames_per_chunk={FRAMES_PER_CHUNK}",
        f"sampler.height={HEIGHT}",
        f"sampler.width={WIDTH}",
        "sampler.fork_batch_size=12",
        "algorithm.group_size=12",
        "algorithm.num_anchors=4",
        "learner.lora.rank=64",
        "learner.lora.alpha=128",
        "learner.gradient_checkpointing=true",
        f"learner.num_cpus_per_worker={cpus['learner']}",
        "rollout.num_workers=1",
        f"rollout.num_cpus_per_worker={cpus['rollout']}",
        "rollout.prompts_per_iteration=1",
        f"rollout.prompts={weights / 'prompts.txt'}",
        f"rewards.models={json.dumps([reward, clip])}",
        "rewards.num_gpus_per_server=0",
        f"rewards.num_cpus_per_server={cpus['rewards']}",
        "replay.num_reference_groups=2",
        "run.iterations=2",
        "run.semi_iterations=1",
        "run.eval_prompts=1",
        "run.eval_seeds=1",
        "run.merge_scales=[0.0, 1.0]",
        f"run.out_of_domain.prompts={weights / 'heldout.txt'}",
        "run.out_of_domain.num_prompts=1",
        f"run.sample_prompts={sample_prompts}",
        f"run.output_dir={root}",
        "run.name=job",
        f"cluster.num_cpus={total}",
        "cluster.call_timeout_s=3600",
        "metrics.port=0",
    ]


def phase_seconds(rows: list[dict], wall: float) -> dict:
    """Seconds per phase from metrics.jsonl's time stamps (seconds since the run folder was made).
    `startup` ends with the first evaluation (Ray, Redis, prompt embeddings, every role loading its
    models, pi_ref evaluated); each phase's checkpoint is written at its end, inside the next span;
    `merge` is the sweep, the on-policy adapter alone and the final evaluation."""

    def last(phase):
        times = [r["time"] for r in rows if r.get("phase") == phase]
        return times[-1] if times else None

    evals = [r["time"] for r in rows if r.get("phase") == "eval"]
    marks = [
        ("startup", evals[0] if evals else None),
        ("reference", last("reference")),
        ("semi", last("semi")),
        ("on_policy", last("on_policy")),
        ("merge", evals[-1] if len(evals) > 1 else None),
    ]
    out, previous = {}, 0.0
    for name, t in marks:
        if t is not None:
            out[name] = round(t - previous, 1)
            previous = t
    out["total"] = round(wall, 1)
    return out


def adapter_update_norms(run_dir: Path) -> dict:
    """Per adapter: ||final - initial|| over all its tensors (L2), the initial state being the first
    checkpoint's (written when the reference phase ended, before any update), and the dtypes."""
    from safetensors.torch import load_file

    first = min((run_dir / "checkpoints").glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    norms, dtypes = {}, set()
    for final in sorted((run_dir / "adapters").glob("*/pytorch_lora_weights.safetensors")):
        name = final.parent.name
        a, b = load_file(str(final)), load_file(str(first / "adapters" / name / final.name))
        if a.keys() != b.keys():
            raise RuntimeError(f"adapter {name}: the final and initial files hold different tensors")
        dtypes |= {str(v.dtype).replace("torch.", "") for v in a.values()}
        norms[name] = float(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5)
    return {"norms": norms, "dtypes": sorted(dtypes), "initial": first.name}


def run_job(args, root: Path, weights: Path) -> dict:
    from cluster.train import RunFolder, run
    from common.config import ConfigError, load_config
    from common.metrics import peak_rss_bytes

    overrides = job_overrides(weights, root, args.layers, args.threads, args.sample_prompts) + args.overrides
    try:
        config = load_config(CONFIG, overrides)
    except ConfigError as exc:
        raise SystemExit(f"bench.real_size: {exc}") from None
    run_dir = root / "job"
    folder = RunFolder(run_dir)
    start = time.perf_counter()
    # Ray prints actors' output on the driver's stdout: keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        summary = run(config, folder)
    wall = time.perf_counter() - start
    # The machine's GEMM rate at the generator's linear shapes, with a role's threads (bench.streaming):
    # the denominator of an MFU. The job's own MFU is not derived: its rollout seconds include the VAE
    # decode, and each group forks at its own pivot; bench.streaming measures rollout/fork/update MFU.
    import torch

    from bench.streaming import gemm_peak

    torch.set_num_threads(args.threads)
    (_, height, width), (_, ph, pw) = config.latent_shape, config.model.transformer.patch_size
    chunk = config.sampler.frames_per_chunk * (height // ph) * (width // pw)  # tokens of one chunk
    dtype, tokens = getattr(torch, config.model.dtype), [chunk, config.sampler.fork_batch_size * chunk]
    peak = gemm_peak(config.model.transformer, tokens, dtype, torch.device(config.model.device))
    rows = [json.loads(x) for x in folder.metrics_path.read_text().splitlines() if x.strip()]
    updates = [r for r in rows if r.get("phase") == "on_policy" and "loss" in r]
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    adapters = adapter_update_norms(run_dir)
    rss = summary.get("role_peak_rss_bytes", {})
    tf = config.model.transformer
    return {
        "finished": bool(summary) and len(updates) >= 2 and all(n > 0 for n in adapters["norms"].values()),
        "dtype": config.model.dtype,
        "lora_dtype": adapters["dtypes"][0] if len(adapters["dtypes"]) == 1 else adapters["dtypes"],
        "groups": summary["groups"],
        "on_policy_updates": len(updates),
        "adapter_update_norm": adapters["norms"],
        "peak_rss_gb": {**{k: round(v / GB, 2) for k, v in rss.items()}, "driver": round(peak_rss_bytes() / GB, 2)},
        "seconds": phase_seconds(rows, wall),
        "weight_sync": [
            {"version": s["version"], "bytes": s["bytes"], "seconds": round(s["seconds"], 3)}
            for s in summary.get("weight_sync_log", [])
        ],
        "weight_sync_bytes": [s["bytes"] for s in summary.get("weight_sync_log", [])],
        "weight_sync_seconds": [round(s["seconds"], 3) for s in summary.get("weight_sync_log", [])],
        "record_bytes": [b for r in rows for b in r.get("record_bytes", [])],
        "checkpoint_bytes": _tree_bytes(checkpoints[-1]) if checkpoints else 0,
        "checkpoints": len(checkpoints),
        "reward_initial": summary["reward_initial"],
        "reward_final": summary["reward_final"],
        "loss": [r["loss"] for r in updates],
        "resolution": [config.sampler.height, config.sampler.width],
        "latent_shape": list(config.latent_shape),
        "num_chunks": config.sampler.num_chunks,
        "frames_per_chunk": config.sampler.frames_per_chunk,
        "video_frames": 1 + config.model.vae_temporal_stride * (config.sampler.num_frames - 1),
        "max_text_tokens": config.model.max_text_tokens,
        "group_size": config.algorithm.group_size,
        "num_anchors": config.algorithm.num_anchors,
        "lora_rank": config.learner.lora.rank,
        "lora_alpha": config.learner.lora.alpha,
        "gradient_checkpointing": config.learner.gradient_checkpointing,
        "transformer": {
            "num_layers": tf.num_layers,
            "dim": tf.num_attention_heads * tf.attention_head_dim,
            "heads": tf.num_attention_heads,
            "head_dim": tf.attention_head_dim,
            "ffn_dim": tf.ffn_dim,
            "text_dim": tf.text_dim,
        },
        "gemm_peak_tflops": round(peak["gemm_peak_tflops"], 4),
        "threads_per_role": args.threads,
        "cluster_cpus": config.cluster.num_cpus,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.real_size", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it indented)")
    parser.add_argument(
        "--layers", type=int, default=30, help="transformer blocks (default %(default)s, the real 1.3B)"
    )
    parser.add_argument(
        "--reward",
        choices=["2b", "tiny"],
        default="2b",
        help="VideoAlign at Qwen2-VL-2B-Instruct's size, or a tiny one (default %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (and Ray CPUs) per role (default %(default)s; see above)"
    )
    parser.add_argument("--sample-prompts", type=int, default=1, help="sample videos at the start and the end")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("runs/real_size"),
        help="where weights and the run go (default %(default)s); replaced if the bench made it",
    )
    parser.add_argument("--keep", action="store_true", help="keep the weight files, checkpoints and adapters (GBs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, applied last")
    args = parser.parse_intermixed_args(argv)
    if args.layers < 1 or args.threads < 1:
        parser.error("--layers and --threads must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root = args.root.resolve()
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            print(
                f"bench.real_size: {root} exists and was not made by this bench; pick another --root", file=sys.stderr
            )
            return 2
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by python -m bench.real_size; removed and remade by its next run\n")
    weights = root / "weights"
    try:
        log.info("writing model files under %s (%d blocks, %s VideoAlign)", weights, args.layers, args.reward)
        manifest = root / "weights.json"
        # spawn: a fresh interpreter, so the GBs it touches never count as the driver's memory.
        child = multiprocessing.get_context("spawn").Process(
            target=write_weights, args=(str(weights), args.layers, args.reward, args.seed, str(manifest))
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"bench.real_size: writing the model files failed (exit code {child.exitcode})", file=sys.stderr)
            return 1
        written = json.loads(manifest.read_text())
        try:
            result = run_job(args, root, weights)
        except Exception as exc:  # noqa: BLE001 - the JSON says what broke; the traceback goes to stderr
            log.exception("the job failed")
            result = {"finished": False, "error": f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"}
    finally:
        if not args.keep:
            for path in (weights, root / "job" / "checkpoints", root / "job" / "adapters", root / "job" / "redis"):
                shutil.rmtree(path, ignore_errors=True)
    params = written["params"]
    result = {
        "finished": result.pop("finished"),
        "params_billion": {k: round(v / 1e9, 4) for k, v in params.items()},
        **result,
        "text_encoder": (
            f"REDUCED UMT5: {UMT5['num_layers']} layers of d_model {UMT5['d_model']} "
            f"({UMT5['num_heads']} heads x {UMT5['d_kv']}, gated-GELU FFN {UMT5['d_ff']}), a word-level "
            "vocabulary of the prompt file's words; the real UMT5-XXL has 24 layers and a 256k "
            "sentencepiece vocabulary, 5.7B parameters"
        ),
        "reward_model": (
            "VideoAlign (VideoReward layout) on Qwen2-VL-2B-Instruct's architecture"
            if args.reward == "2b"
            else "VideoAlign (VideoReward layout) on a tiny Qwen2-VL"
        ),
        "reward_frame_pixels": [56, 56],
        "weights_written": {
            "seconds": round(written["total_seconds"], 1),
            "file_gb": {k: round(v / GB, 3) for k, v in written["file_bytes"].items()},
            "writer_peak_rss_gb": round(written["peak_rss_bytes"] / GB, 2),
        },
        "root": str(root),
        "kept_weights": args.keep,
    }
    (root / "real_size.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
