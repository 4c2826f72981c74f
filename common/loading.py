"""Real weights from local paths: Self-Forcing checkpoints, diffusers directories, Wan VAE, UMT5.

Nothing is downloaded. Every failure raises `CheckpointError` naming the file and the key or shape
at fault, so a wrong path or a half-copied checkpoint is caught before any GPU time is spent.

Self-Forcing ships a torch file whose `generator_ema` / `generator` entries hold the generator's
state dict in the original Wan key layout behind its wrapper's `model.` prefix
(`model.blocks.0.self_attn.q.weight`, `model.head.head.weight`, ...). diffusers' own Wan
single-file conversion renames those keys to its layout; `save_self_forcing_checkpoint` writes the
inverse, and a test proves the two compose to the identity on every key of the model.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from common.causal_wan import CausalWanTransformer3DModel

log = logging.getLogger(__name__)

# Wrapper fragments seen in Self-Forcing / FSDP / torch.compile state dicts, never part of Wan's keys.
_WRAPPER_FRAGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_orig_mod|_checkpoint_wrapped_module)\.")
_SELF_FORCING_PREFIX = "model."

# diffusers -> original Wan names, applied in order (the inverse of diffusers' conversion).
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers' cross-attention norm is Wan's norm3 (the affine one)
    ("proj_out", "head.head"),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key or shape."""


def _to_original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.endswith(".scale_shift_table"):
        return key[: -len("scale_shift_table")] + "modulation"
    for new, old in _TO_ORIGINAL:
        key = key.replace(new, old)
    return key


def to_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_to_original_key(k): v for k, v in state_dict.items()}


def to_diffusers_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        key = _WRAPPER_FRAGMENTS.sub(r"\1", key)
        if key.startswith(_SELF_FORCING_PREFIX) and not key.startswith("model.diffusion_model."):
            key = key[len(_SELF_FORCING_PREFIX):]
        stripped[key] = value
    return convert_wan_transformer_to_diffusers(stripped)


def _read_state_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        # weights_only: a checkpoint is data; arbitrary pickled objects are refused, never executed.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged archives surface as many exception types
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists the offending keys and shapes."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    if wrong:
        problems.append("shape mismatch (key, checkpoint, model) " + "; ".join(map(str, wrong[:5])))
    if problems:
        raise CheckpointError(f"{source}: does not fit the configured model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_self_forcing_checkpoint(path, model_config: dict, *, key: str = "generator_ema",
                                 model_cls=CausalWanTransformer3DModel, dtype: torch.dtype = torch.float32):
    """A Self-Forcing `.pt` (state dict under `key`) or an original-layout `.safetensors` file."""
    path = Path(path)
    raw = _read_state_file(path)
    if path.suffix != ".safetensors":
        if not isinstance(raw, dict) or key not in raw:
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{path}: no {key!r} entry (found {found}); set model.checkpoint_key")
        raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: {key!r} is not a state dict of tensors")
    model = model_cls(**model_config)
    load_state_into(model, to_diffusers_layout(dict(raw)), f"{path} [{key}]")
    return model.cast(dtype) if hasattr(model, "cast") else model.to(dtype)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_self_forcing_checkpoint(model: torch.nn.Module, path, key: str = "generator_ema") -> Path:
    """Write `model` as Self-Forcing does: {key: {"model.<original Wan key>": tensor}}, atomically."""
    state = {_SELF_FORCING_PREFIX + k: v.detach().cpu().contiguous()
             for k, v in to_original_layout(model.state_dict()).items()}
    path = Path(path)
    _atomic_torch_save({key: state}, path)
    return path


def load_diffusers_transformer(path, model_cls=CausalWanTransformer3DModel, dtype: torch.dtype = torch.float32):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers model directory (no config.json)")
    if not any(path.glob("diffusion_pytorch_model*.safetensors")) and not any(path.glob("diffusion_pytorch_model*.bin")):
        raise CheckpointError(f"{path}: no diffusion_pytorch_model weights")
    try:
        return model_cls.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot load as {model_cls.__name__}: {exc}") from None


def load_vae(path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers AutoencoderKLWan directory (no config.json)")
    try:
        return AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot load the Wan VAE: {exc}") from None


def _latent_stats(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
    return mean, std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised Wan latents [B, C, F, h, w] -> uint8 frames [B, F', H, W, 3] (F' = 1 + 4 (F - 1))."""
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean, std = _latent_stats(vae, latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]  # [B, 3, F', H, W] in [-1, 1]
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [B, F, H, W, 3] -> normalised latents (the posterior mode)."""
    x = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    x = x.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    latents = vae.encode(x).latent_dist.mode()
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


class TextEncoder:
    """UMT5 prompt embeddings as Wan pipelines make them: padded to `max_length` tokens, the
    positions after each prompt zeroed. Embeddings are cached per prompt (prompts repeat a lot)."""

    def __init__(self, encoder_path, tokenizer_path=None, max_length: int = 512, cache_size: int = 1024,
                 dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoTokenizer, UMT5EncoderModel

        encoder_path = Path(encoder_path)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else encoder_path
        for p in (encoder_path, tokenizer_path):
            if not p.is_dir():
                raise CheckpointError(f"text encoder path not found: {p}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
            self.model = UMT5EncoderModel.from_pretrained(str(encoder_path), torch_dtype=dtype).to(device).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{encoder_path} / {tokenizer_path}: cannot load UMT5: {exc}") from None
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            tokens = self.tokenizer(todo, padding="max_length", max_length=self.max_length, truncation=True,
                                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            full = self.tokenizer(todo, add_special_tokens=True)["input_ids"]
            for prompt, ids in zip(todo, full):
                if len(ids) > self.max_length:
                    log.warning("prompt truncated to %d tokens (had %d): %.60s...", self.max_length, len(ids), prompt)
            device = next(self.model.parameters()).device
            mask = tokens.attention_mask.to(device)
            hidden = self.model(tokens.input_ids.to(device), mask).last_hidden_state
            hidden = hidden * mask[..., None].to(hidden.dtype)
            for prompt, h in zip(todo, hidden):
                self._cache[prompt] = h.cpu()
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(out)


def load_policy(config) -> CausalWanTransformer3DModel:
    """The generator the config names: a Self-Forcing checkpoint, a diffusers directory, or (neither
    set) random weights of the configured size, seeded by `model.seed` (benchmarks, tests)."""
    m = config.model
    dtype = getattr(torch, m.dtype)
    if m.self_forcing_checkpoint is not None:
        model = load_self_forcing_checkpoint(m.self_forcing_checkpoint, m.transformer.kwargs(),
                                             key=m.checkpoint_key, dtype=dtype)
    elif m.diffusers_transformer is not None:
        model = load_diffusers_transformer(m.diffusers_transformer, dtype=dtype)
        if model.config.patch_size is not None and tuple(model.config.patch_size) != tuple(m.transformer.patch_size):
            raise CheckpointError(f"{m.diffusers_transformer}: patch size {model.config.patch_size} differs from "
                                  f"model.transformer.patch_size {m.transformer.patch_size}")
    else:
        torch.manual_seed(m.seed)
        model = CausalWanTransformer3DModel(**m.transformer.kwargs()).cast(dtype)
    return model.to(m.device).eval().requires_grad_(False)


def load_text_encoder(config):
    """An object with `encode(prompts) -> [B, tokens, text_dim]`: UMT5, or the toy world's encoder."""
    m = config.model
    if m.text_encoder_kind == "toy":
        from common.toy_world import ToyTextEncoder

        return ToyTextEncoder(dim=m.transformer.text_dim)
    if m.text_encoder is None:
        raise CheckpointError("model.text_encoder is not set (a local UMT5 encoder directory)")
    return TextEncoder(m.text_encoder, m.tokenizer, max_length=m.max_text_tokens,
                       dtype=getattr(torch, m.dtype), device=m.device)
