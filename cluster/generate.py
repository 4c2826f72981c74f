"""The aligned streaming generator as a user runs it: videos for a prompt file, each chunk decoded and
appended to its mp4 as soon as the generator finishes it.

    python -m cluster.generate --config runs/demo/export/config.yaml --adapter runs/demo/export \\
        --prompts prompts.txt [--out DIR] [--seed N] [--fps F] [--upscale K] [overrides...]

--adapter is a folder `python -m cluster.export` wrote: its pytorch_lora_weights.safetensors (the
folded W_base + dW_semi + s dW_on) is loaded on the config's base model; or a fused transformer
folder (config.json + safetensors, the export's transformer/), which then replaces the base.
Every prompt gets the noise plan of --seed (default 7, the seed of the job's sample videos), so a
video here equals the one the run's merged policy makes for that prompt and seed.

Writes <out> (default <adapter>/videos): video_<i>.mp4 in prompt-file order and prompts.txt. Prints
one line per prompt and then one JSON line: first_chunk_latency_s (from a prompt's start to its first
chunk's frames in the mp4, mean over prompts), frames_per_second (decoded frames over generation
seconds, model loading not included), videos (the paths), and frames, generation_seconds, load_seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.config import Config
    from common.model.sampler import StreamingSampler
    from common.model.streaming_decode import ChunkDecoder

ADAPTER_NAME = "aligned"
# The job's sample videos use noise seed 7 for every prompt (cluster/driver.py SAMPLE_SEED).
DEFAULT_SEED = 7
DEFAULT_FPS = 16.0  # Wan2.1's frame rate


class GenerateError(ValueError):
    """An adapter folder or prompt file that cannot be used; the message names it."""


@dataclass
class Generator:
    model: torch.nn.Module
    sampler: StreamingSampler
    text_encoder: object  # CachedTextEncoder: encode(prompts) -> [B, tokens, dim]
    decoder: ChunkDecoder

    def text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).to(self.sampler.device)


def is_fused(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _with_base(config: Config, transformer_dir: Path) -> Config:
    model = config.model.model_copy(update={"diffusers_transformer": transformer_dir, "self_forcing_checkpoint": None})
    return config.model_copy(update={"model": model})


def load_generator(config: Config, adapter_dir: str | Path) -> Generator:
    """The config's model with the exported adapter active, or the fused transformer as the base;
    the streaming sampler, the text encoder and the chunk decoder."""
    from common.model import adapters
    from common.model.loading import load_policy
    from common.model.prompt_cache import CachedTextEncoder
    from common.model.sampler import StreamingSampler
    from common.model.streaming_decode import chunk_decoder

    adapter_dir = Path(adapter_dir)
    lora_file = adapter_dir / adapters.LORA_FILE
    if is_fused(adapter_dir):
        if lora_file.is_file():
            # Both would apply the delta twice; which one was meant cannot be guessed.
            raise GenerateError(f"{adapter_dir}: holds a fused transformer and {adapters.LORA_FILE}; pass one")
        model = load_policy(_with_base(config, adapter_dir))
    elif lora_file.is_file():
        model = load_policy(config)
        adapters.load_adapter(model, adapter_dir, ADAPTER_NAME)
        adapters.use_adapter(model, ADAPTER_NAME)
    else:
        raise GenerateError(
            f"{adapter_dir}: neither {adapters.LORA_FILE} nor a fused transformer (config.json + safetensors); "
            "python -m cluster.export writes them"
        )
    sampler = StreamingSampler.from_config(model, config)
    return Generator(model, sampler, CachedTextEncoder(config, encoder_on_miss=True), chunk_decoder(config))


@torch.no_grad()
def stream_video(gen: Generator, prompt: str, seed: int, path: Path, fps: float, upscale: int) -> dict:
    """One prompt: chunks generated, decoded and encoded into `path` as each finishes. Returns its
    frame count and timings (seconds from the start of the prompt)."""
    from common.video import Mp4Writer

    start = time.perf_counter()
    first_chunk_s = None
    gen.decoder.reset()
    with Mp4Writer(path, fps=fps, upscale=upscale) as video:
        for chunk in gen.sampler.stream(gen.text([prompt]), gen.sampler.noise_plan(seed)):
            video.write(gen.decoder(chunk.latents)[0])
            if first_chunk_s is None:
                first_chunk_s = time.perf_counter() - start
        frames = video.frames
    return {"frames": frames, "first_chunk_s": first_chunk_s, "seconds": time.perf_counter() - start}


def check_prompts(config: Config, prompts: list[str], where: Path) -> None:
    """Refuse, before any model is loaded, prompts the toy world's encoder cannot read (UMT5 reads any)."""
    from common.config import is_toy_world

    if not is_toy_world(config.model):
        return
    from common.toy.world import ToyPrompt

    for prompt in prompts:
        try:
            ToyPrompt.parse(prompt)
        except ValueError as exc:
            raise GenerateError(f"{where}: {exc}") from None


def default_upscale(config: Config) -> int:
    # As cluster.evaluate shows videos: at least 128 pixels wide, so a 16x16 toy video can be watched.
    return max(1, 128 // config.sampler.width)


def generate(
    config: Config,
    adapter_dir: str | Path,
    prompts: list[str],
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    fps: float = DEFAULT_FPS,
    upscale: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """One mp4 per prompt in `out_dir` (video_<i>.mp4, prompts.txt); returns the summary JSON."""
    from common.durable import write_bytes_atomic

    if not prompts:
        raise GenerateError("no prompts to generate")
    out_dir = Path(out_dir)
    upscale = default_upscale(config) if upscale is None else upscale
    loading = time.perf_counter()
    gen = load_generator(config, adapter_dir)
    load_seconds = time.perf_counter() - loading
    width = len(str(len(prompts) - 1))
    videos, first, frames, seconds = [], [], 0, 0.0
    for i, prompt in enumerate(prompts):
        path = out_dir / f"video_{i:0{width}d}.mp4"
        stats = stream_video(gen, prompt, seed, path, fps, upscale)
        videos.append(str(path))
        first.append(stats["first_chunk_s"])
        frames += stats["frames"]
        seconds += stats["seconds"]
        log(
            f"[{i + 1}/{len(prompts)}] {path}: {stats['frames']} frames, first chunk after "
            f"{stats['first_chunk_s']:.3f} s, {stats['seconds']:.3f} s in all: {prompt}"
        )
    write_bytes_atomic(out_dir / "prompts.txt", ("\n".join(prompts) + "\n").encode())
    return {
        "first_chunk_latency_s": sum(first) / len(first),
        "frames_per_second": frames / seconds,
        "frames": frames,
        "generation_seconds": seconds,
        "load_seconds": load_seconds,
        "seed": seed,
        "videos": videos,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the model's config (an export's config.yaml)")
    parser.add_argument("--adapter", type=Path, required=True, help="an export folder, or a fused transformer folder")
    parser.add_argument("--prompts", type=Path, required=True, help="UTF-8 prompt file, one prompt per line")
    parser.add_argument("--out", type=Path, default=None, help="video folder (default: <adapter>/videos)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed of every prompt's video")
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS)
    parser.add_argument("--upscale", type=int, default=None, help="pixel repeat (default: to >= 128 pixels wide)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.device=cuda")
    args = parser.parse_intermixed_args(argv)

    from cluster.prompts import PromptError, read_prompt_file
    from common.config import load_config_for_cli, missing_paths
    from common.model.adapters import AdapterError
    from common.model.loading import CheckpointError
    from common.model.prompt_cache import PromptCacheError

    config = load_config_for_cli(args.config, args.overrides)
    if config is None:
        return 2
    try:
        if is_fused(args.adapter):
            config = _with_base(config, args.adapter)
        # Only what generating opens: reward models and prompt lists of the training job do not matter.
        problems = [line for line in missing_paths(config) if line.startswith("model.")]
        if problems:
            raise GenerateError("\n".join(problems))
        prompts = read_prompt_file(args.prompts, key="--prompts")
        check_prompts(config, prompts, args.prompts)
        result = generate(
            config, args.adapter, prompts, args.out or args.adapter / "videos", args.seed, args.fps, args.upscale
        )
    except (GenerateError, PromptError, PromptCacheError, AdapterError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
