"""The policy every role holds: the causal generator with its two LoRA adapters, the streaming
sampler, the text encoder and the decoder, built from the config alone.

Rollout workers and learners build it the same way, so a weight sync only has to carry adapter
tensors (or, with `cluster.weight_sync=full`, every tensor) and both sides agree on the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common import adapters
from common.loading import decode_latents, load_policy, load_text_encoder, load_vae
from common.sampler import StreamingSampler

# What a rollout runs as: pi_ref, one adapter, or the merged model (METHOD.md sections 4-5).
MODES = ("reference", adapters.ON_POLICY, adapters.SEMI, "merged")


@dataclass
class Policy:
    model: torch.nn.Module
    sampler: StreamingSampler
    text_encoder: object
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> pixel videos [B, 3, F, H, W] in [-1, 1]

    @classmethod
    def from_config(cls, config) -> "Policy":
        model = load_policy(config)
        lora = config.learner.lora
        # LoRA's A matrices start random: seed them, so every learner rank and every run starts from
        # the same adapter (B starts at zero, so the policy equals the base either way).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.model.seed)
            adapters.add_adapters(model, lora.rank, lora.alpha, lora.target_modules)
        sampler = StreamingSampler.from_config(model, config)
        if config.model.latent_space == "pixels":
            decode = pixels_as_video
        else:
            vae = load_vae(config.model.vae, dtype=getattr(torch, config.model.dtype)).to(config.model.device)
            decode = lambda latents: decode_latents(vae, latents).float() / 127.5 - 1.0  # noqa: E731
        return cls(model, sampler, load_text_encoder(config), decode)

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
        return {f"{name}/{k}": v for name in adapters.ADAPTERS
                for k, v in adapters.adapter_state_dict(self.model, name).items()}

    def load_synced_tensors(self, tensors: dict[str, torch.Tensor], what: str = "adapters") -> None:
        if what == "full":
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise ValueError(f"full weight sync: missing {missing[:3]}, unexpected {unexpected[:3]}")
            return
        for name in adapters.ADAPTERS:
            prefix = f"{name}/"
            adapters.load_adapter_state_dict(
                self.model, name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def pixels_as_video(latents: torch.Tensor) -> torch.Tensor:
    """The pixel-space toy world has no decoder: the latents are the frames."""
    return latents.clamp(-1.0, 1.0)
