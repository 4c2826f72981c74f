"""Decode a streaming generator's video chunk by chunk, as each chunk is finished.

The Wan VAE's decoder is causal in time: diffusers' `AutoencoderKLWan._decode` feeds it one latent
frame at a time and carries a feature cache (the last frames each causal convolution saw) from one
frame to the next. `WanVaeChunkDecoder` runs that same loop, but keeps the cache in the decoder object
between calls, so a chunk's frames come out as soon as its latents do and the concatenation of the
chunks' frames is exactly `loading.decode_latents` of the whole video (tests/test_generate.py):

    decoder = chunk_decoder(config)            # or WanVaeChunkDecoder(vae) / PixelChunkDecoder()
    for chunk in sampler.stream(text, plan):
        frames = decoder(chunk.latents)        # uint8 [B, F', H, W, 3] on the CPU
    decoder.reset()                            # before the next video

The first latent frame of a video gives 1 frame, every later one 4 (Wan's temporal stride), so a
first chunk of f latent frames gives 1 + 4 (f - 1) frames and every later chunk 4 f.

The pixel-space toy world has no VAE: a chunk is converted as `policy.pixels_as_video` converts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from common.model.loading import CheckpointError, _latent_stats, _vae_device, load_vae
from common.video import to_uint8

if TYPE_CHECKING:
    from common.config import Config


class ChunkDecoder(Protocol):
    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...
    def reset(self) -> None: ...


class PixelChunkDecoder:
    """The toy world's chunks are frames already ([B, 3, f, H, W] in [-1, 1]): no state to keep."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return to_uint8(latents).contiguous().cpu()

    def reset(self) -> None:
        pass


class WanVaeChunkDecoder:
    """Normalised Wan latent chunks [B, z_dim, f, h, w] -> uint8 frames [B, F', 8 h, 8 w, 3], one chunk
    per call, with the decoder's causal feature cache kept between calls (see the module docstring).

    The cache is this object's, not the VAE's (`vae._feat_map`), so whole-video decodes of the same
    VAE in between cannot clobber a stream, nor a stream theirs. With `vae.use_slicing` diffusers
    decodes a batch one video at a time; so does this, with one cache per video, so that the frames
    equal decode_latents' bit for bit either way."""

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: the next chunk is a video's first."""
        self._caches: list[list] | None = None
        self._frames_seen = 0

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(f"latents must be [B, {vae.config.z_dim}, f, h, w], got {tuple(latents.shape)}")
        self._refuse_tiling(latents)
        batch = latents.shape[0]
        videos = [slice(i, i + 1) for i in range(batch)] if vae.use_slicing and batch > 1 else [slice(None)]
        if self._caches is None:
            self._caches = [[None] * self._num_convs for _ in videos]
            self._batch = batch
        elif batch != self._batch:
            raise ValueError(f"a chunk of {batch} videos after chunks of {self._batch}; reset() between videos")
        latents = latents.to(device=_vae_device(vae), dtype=vae.dtype)
        mean, std = _latent_stats(vae, latents)
        # Un-normalised as decode_latents does; post_quant_conv is a 1x1x1 convolution, so a chunk's
        # frames do not depend on any other chunk before the decoder proper.
        x = vae.post_quant_conv(latents * std + mean)
        out = torch.cat([self._decode_frames(x[part], cache) for part, cache in zip(videos, self._caches, strict=True)])
        self._frames_seen += latents.shape[2]
        return to_uint8(out.float()).cpu()

    def _decode_frames(self, x: torch.Tensor, cache: list) -> torch.Tensor:
        frames = []
        for i in range(x.shape[2]):
            # A fresh index per frame, as _decode resets _conv_idx: each causal conv finds its own
            # slot of the cache by the order the decoder calls them in.
            first = self._frames_seen + i == 0
            frames.append(self.vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first))
        out = torch.cat(frames, dim=2)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    def _refuse_tiling(self, latents: torch.Tensor) -> None:
        # Tiled decoding keeps a cache per spatial tile and blends overlaps: a different computation,
        # whose frames this decoder would not reproduce. load_vae never turns it on.
        vae = self.vae
        h, w = latents.shape[-2:]
        ratio = vae.spatial_compression_ratio
        if vae.use_tiling and (w > vae.tile_sample_min_width // ratio or h > vae.tile_sample_min_height // ratio):
            raise ValueError("WanVaeChunkDecoder does not stream a tiled VAE decode; call vae.disable_tiling()")


def chunk_decoder(config: Config, vae=None) -> ChunkDecoder:
    """The chunk decoder for the config's latent space: frames as they are for the pixel-space toy
    world, else the Wan VAE of model.vae (or `vae`, when the caller has one loaded)."""
    if config.model.latent_space == "pixels":
        return PixelChunkDecoder()
    if vae is None:
        if config.model.vae is None:
            raise CheckpointError(
                "model.vae is not set; model.latent_space=wan_vae decodes with a local Wan VAE directory"
            )
        vae = load_vae(config.model.vae, dtype=getattr(torch, config.model.dtype)).to(config.model.device)
    return WanVaeChunkDecoder(vae)
