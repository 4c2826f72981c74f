"""The policy every role holds: the causal generator with its two LoRA adapters, the streaming
sampler, the prompt embeddings and the decoder, built from the config alone.

Prompt embeddings come from the job's prompt-embedding file (common/model/prompt_cache.py): a learner
never builds the text encoder; a rollout worker builds it only for a prompt the file lacks.
The decoder gives uint8 frames [B, F, H, W, 3] on the CPU, converted on the device in sub-batches of
`rollout.decode_batch_size`, which is what reward servers, evaluation and sample videos take.

Rollout workers and learners build it the same way, so a weight sync only has to carry adapter
tensors (or, with `cluster.weight_sync=full`, every tensor) and both sides agree on the names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.model import adapters
from common.model.loading import decode_latents, load_policy, load_vae
from common.model.prompt_cache import CachedTextEncoder
from common.model.sampler import StreamingSampler
from common.video import to_uint8

if TYPE_CHECKING:
    from common.config import Config

# What a rollout runs as: pi_ref, one adapter, or the merged model (docs/method.md sections 4-5).
MODES = ("reference", adapters.ON_POLICY, adapters.SEMI, "merged")


@dataclass
class Policy:
    model: torch.nn.Module
    sampler: StreamingSampler
    text_encoder: CachedTextEncoder
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> uint8 frames [B, F, H, W, 3] on the CPU

    @classmethod
    def from_config(cls, config: Config, role: str = "rollout") -> Policy:
        """`role="rollout"` (rollout workers, in-process tools): prompt embeddings from
        model.prompt_cache, the text encoder built on a miss, and the decoder. `role="learner"`:
        embeddings from the file only, and no decoder (a learner never sees pixels), so neither the
        text encoder nor the VAE takes its memory."""
        if role not in ("rollout", "learner"):
            raise ValueError(f"Policy role {role!r}: 'rollout' or 'learner'")
        model = load_policy(config)
        lora = config.learner.lora
        # LoRA's A matrices start random: seed them, so every learner rank and every run starts from
        # the same adapter (B starts at zero, so the policy equals the base either way).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.model.seed)
            adapters.add_adapters(model, lora.rank, lora.alpha, lora.target_modules)
        sampler = StreamingSampler.from_config(model, config)
        text_encoder = CachedTextEncoder(config, encoder_on_miss=role == "rollout")
        if role == "learner":
            return cls(model, sampler, text_encoder, no_decoder)
        if config.model.latent_space == "pixels":
            decode_one = pixels_as_video
        else:
            vae = load_vae(config.model.vae, dtype=getattr(torch, config.model.dtype)).to(config.model.device)
            decode_one = lambda latents: decode_latents(vae, latents)  # noqa: E731
        batch = config.rollout.decode_batch_size
        decode = lambda latents: decode_in_batches(decode_one, latents, batch)  # noqa: E731
        return cls(model, sampler, text_encoder, decode)

    def base_fingerprint(self) -> str:
        """A digest of the base weights: every role must start from the same checkpoint, and a file
        replaced while a job starts would otherwise make rollouts and learner silently disagree."""
        import hashlib

        h = hashlib.blake2b(digest_size=12)
        for name, value in sorted(self.model.state_dict().items()):
            if "lora_" in name:
                continue
            h.update(name.encode())
            h.update(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).to(self.sampler.device)

    @torch.no_grad()
    def videos(self, prompts: list[str], seeds: list[int], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(prompts, uint8 frames) of `batch_size` videos at a time (`run.eval_batch_size`): a batch's
        KV cache bounds evaluation memory, and each video depends only on its prompt and noise seed."""
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            yield p, self.decode(self.sampler.generate(self.text(p), self.sampler.noise_plan(*s)))

    def set_mode(self, mode: str, merge_scale: float = 1.0) -> None:
        if mode == "reference":
            self.model.disable_adapters()
        elif mode == "merged":
            adapters.merge_adapters(self.model, merge_scale)
        elif mode in adapters.ADAPTERS:
            adapters.use_adapter(self.model, mode)
        else:
            raise ValueError(f"unknown policy mode {mode!r}; known: {MODES}")

    def synced_tensors(self, what: str = "adapters") -> dict[str, torch.Tensor]:
        """The tensors a weight sync ships: both adapters (prefixed by adapter name), or all of them."""
        if what == "full":
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        return {
            f"{name}/{k}": v
            for name in adapters.ADAPTERS
            for k, v in adapters.adapter_state_dict(self.model, name).items()
        }

    def load_synced_tensors(self, tensors: dict[str, torch.Tensor], what: str = "adapters") -> None:
        if what == "full":
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise ValueError(f"full weight sync: missing {missing[:3]}, unexpected {unexpected[:3]}")
            return
        for name in adapters.ADAPTERS:
            prefix = f"{name}/"
            adapters.load_adapter_state_dict(
                self.model, name, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )


def no_decoder(latents: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("a learner's policy has no decoder (Policy.from_config(role='learner') loads no VAE)")


def decode_in_batches(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """`decode` on `batch_size` videos at a time: the device holds one sub-batch's float frames,
    and each leaves it as uint8 before the next is decoded."""
    if latents.shape[0] <= batch_size:
        return decode(latents)
    return torch.cat([decode(latents[i : i + batch_size]) for i in range(0, latents.shape[0], batch_size)])


def pixels_as_video(latents: torch.Tensor) -> torch.Tensor:
    """The pixel-space toy world's decoder: the latents are the frames ([B, 3, F, H, W] in [-1, 1]),
    given as every decoder gives them, uint8 [B, F, H, W, 3] on the CPU, converted on the device."""
    return to_uint8(latents).contiguous().cpu()
