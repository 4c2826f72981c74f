"""Real weights from local paths: Self-Forcing checkpoints, diffusers directories, the Wan VAE, UMT5.

Nothing is downloaded. Every failure raises `CheckpointError` naming the file and the keys or shapes
at fault, so a wrong path, a half-copied file or a checkpoint of another size is caught before any
GPU time is spent. The libraries underneath are not strict by themselves: diffusers' and
transformers' `from_pretrained` fill weights missing from a checkpoint with random values and only
log it, so every loader here asks for their loading report and refuses an incomplete load.

Key layouts. Self-Forcing ships a torch file `{"generator_ema": sd, "generator": sd, ...}` whose state
dicts use the ORIGINAL Wan names behind the `model.` of its `WanDiffusionWrapper`
(`model.blocks.0.self_attn.q.weight`, `model.head.head.weight`, ...). diffusers' own Wan single-file
conversion (`convert_wan_transformer_to_diffusers`) turns those names into the diffusers layout of
`WanTransformer3DModel`, so the rename rules live in exactly one place and follow diffusers' updates.
The way back (`save_self_forcing_checkpoint`) is not a second hand-written table: the original names
a model of the given size must have are listed, pushed through that same conversion, and the result
inverted; the inversion is checked to be a bijection onto the model's keys every time it is built.

Public API:
    CheckpointError
    load_self_forcing_checkpoint / save_self_forcing_checkpoint
    load_diffusers_transformer
    load_vae, decode_latents, encode_frames
    TextEncoder
    to_diffusers_layout, to_original_layout, original_key_map,
    strip_wrapper_prefixes                                       (the key-layout conversions)
    load_policy, load_text_encoder                               (what the config names)
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from common.durable import torch_save_atomic
from common.model.causal_wan import CausalWanTransformer3DModel

if TYPE_CHECKING:
    from common.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "TextEncoder",
    "compile_blocks",
    "decode_latents",
    "encode_frames",
    "load_diffusers_transformer",
    "load_policy",
    "load_self_forcing_checkpoint",
    "load_text_encoder",
    "load_vae",
    "original_key_map",
    "pad_tokens",
    "save_self_forcing_checkpoint",
    "strip_wrapper_prefixes",
    "to_diffusers_layout",
    "to_original_layout",
]

# The prefix Self-Forcing's WanDiffusionWrapper puts before every Wan key (it holds `self.model`).
SELF_FORCING_PREFIX = "model."

# Fragments that wrappers insert anywhere in a key (FSDP, activation checkpointing, torch.compile).
# None of them is ever part of a Wan module name, so removing them cannot merge two real keys.
_WRAPPER_FRAGMENTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# Prefixes that wrappers put in front of the whole model: DDP's `module.`, Self-Forcing's `model.`,
# ComfyUI-style `model.diffusion_model.`. Wan's own top-level modules (patch_embedding, blocks,
# head, ...) never use these names, so stripping them repeatedly is safe.
_LEADING_PREFIXES = ("module.", "model.", "diffusion_model.")
# Names that only exist in the diffusers layout: a file holding them was saved from diffusers, and
# pushing it through the original->diffusers rename would scramble it (norm2/norm3 are swapped).
_DIFFUSERS_ONLY = ("condition_embedder.", ".attn1.", ".attn2.", "scale_shift_table", "proj_out.")
# Wan-Animate parts: diffusers' conversion reshapes/splits their tensors, which the name-only use
# of the conversion below cannot express. This project only runs the text-to-video model.
_UNSUPPORTED = ("motion_encoder.", "face_adapter.")
_SHOW = 5  # offending keys listed per kind of problem; the counts are always given in full


class CheckpointError(ValueError):
    """Weights that cannot be loaded. The message names the file and the keys or shapes at fault."""


# ---------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(key: str) -> str:
    """`model._fsdp_wrapped_module.blocks.0._orig_mod.ffn.0.weight` -> `blocks.0.ffn.0.weight`."""
    key = _WRAPPER_FRAGMENTS.sub("", key)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _shown(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _diffusers_names(file_keys: Iterable[str], where: str) -> dict[str, str]:
    """Map each diffusers key to the file key it comes from, using diffusers' Wan conversion.

    The conversion only renames keys (for the text-to-video model), so it is run on a dict whose
    values are the file's key names: what comes out maps new names to old ones, and the tensors
    never need to be touched or copied.
    """
    stripped: dict[str, str] = {}
    for key in file_keys:
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: state dict key {key!r} is not a string")
        short = strip_wrapper_prefixes(key)
        if short in stripped:
            raise CheckpointError(
                f"{where}: keys {stripped[short]!r} and {key!r} both name {short!r} once wrapper prefixes are removed"
            )
        stripped[short] = key
    diffusers_like = [old for short, old in stripped.items() if any(m in short for m in _DIFFUSERS_ONLY)]
    if diffusers_like:
        raise CheckpointError(
            f"{where}: keys in the diffusers layout, not the original Wan one "
            f"({_shown(diffusers_like)}); load a diffusers directory with "
            "load_diffusers_transformer instead"
        )
    unsupported = [k for k in stripped.values() if any(m in k for m in _UNSUPPORTED)]
    if unsupported:
        raise CheckpointError(f"{where}: Wan-Animate keys are not supported ({_shown(unsupported)})")
    converted = convert_wan_transformer_to_diffusers(dict(stripped))
    if len(converted) != len(stripped):
        # Two file keys renamed onto one diffusers key: a checkpoint of a layout we do not know.
        lost = sorted(set(stripped.values()) - set(converted.values()))
        raise CheckpointError(f"{where}: keys collide after diffusers' Wan conversion: {_shown(lost)}")
    return converted


def to_diffusers_layout(state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> dict[str, torch.Tensor]:
    """Original-layout Wan state dict (any wrapper prefixes) -> diffusers `WanTransformer3DModel` keys."""
    return {new: state_dict[old] for new, old in _diffusers_names(state_dict.keys(), where).items()}


def _original_wan_names(num_layers: int, qk_norm: bool, cross_attn_norm: bool) -> list[str]:
    """Every parameter name of the original text-to-video `WanModel` (Wan2.1 `wan/modules/model.py`).

    This is a description of the file format, not a rename table: nn.Sequential indices are where
    Wan's Linear layers sit (GELU/SiLU in between hold no weights), norm1/norm2 and the head's norm
    have no affine parameters, norm3 (before cross-attention) has them only with `cross_attn_norm`,
    and the q/k RMS norms exist only with `qk_norm`.
    """
    linear = ("weight", "bias")
    names = [f"patch_embedding.{p}" for p in linear]
    names += [f"text_embedding.{i}.{p}" for i in (0, 2) for p in linear]
    names += [f"time_embedding.{i}.{p}" for i in (0, 2) for p in linear]
    names += [f"time_projection.1.{p}" for p in linear]
    for n in range(num_layers):
        block = f"blocks.{n}"
        for attn in ("self_attn", "cross_attn"):
            names += [f"{block}.{attn}.{proj}.{p}" for proj in "qkvo" for p in linear]
            if qk_norm:
                names += [f"{block}.{attn}.norm_q.weight", f"{block}.{attn}.norm_k.weight"]
        if cross_attn_norm:
            names += [f"{block}.norm3.{p}" for p in linear]
        names += [f"{block}.ffn.{i}.{p}" for i in (0, 2) for p in linear]
        names.append(f"{block}.modulation")
    names += [f"head.head.{p}" for p in linear] + ["head.modulation"]
    return names


def original_key_map(model: torch.nn.Module) -> dict[str, str]:
    """{diffusers key: original Wan key} for every entry of `model.state_dict()`.

    Derived by converting the original names with diffusers' conversion and inverting the result,
    then checked: every model key must be reached by exactly one original name. A model that is not
    a plain text-to-video Wan (image conditioning, LoRA layers not merged) fails here by name.
    """
    cfg = model.config
    names = _original_wan_names(cfg.num_layers, cfg.qk_norm is not None, bool(cfg.cross_attn_norm))
    forward = _diffusers_names(names, f"{type(model).__name__} key map")
    model_keys = set(model.state_dict().keys())
    unmapped = sorted(model_keys - forward.keys())
    extra = sorted(forward.keys() - model_keys)
    if unmapped or extra:
        raise CheckpointError(
            f"{type(model).__name__}: no exact original-Wan name mapping; model keys without an "
            f"original name: [{_shown(unmapped)}]; original names the model lacks: "
            f"[{_shown([forward[k] for k in extra])}]"
        )
    return forward


def to_original_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under the original Wan names (no wrapper prefix)."""
    names = original_key_map(model)
    return {names[k]: v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Self-Forcing checkpoints
# ---------------------------------------------------------------------------------------------


def _read_weights_file(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or corrupted?): {_first_line(exc)}"
            ) from None
    try:
        # weights_only: a checkpoint is data. Pickled objects other than tensors and containers are
        # refused by torch's restricted unpickler rather than executed.
        # mmap: a Self-Forcing file also carries entries we do not load (the other generator, a
        # critic); mapped, only the tensors actually copied into the model are read from disk.
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip (legacy) format
    except Exception as exc:  # noqa: BLE001 - a damaged archive surfaces as zipfile, pickle, EOF or RuntimeError
        if "Weights only load failed" in str(exc):
            # torch's first line is boilerplate; the unpickler's own reason follows it.
            reason = next((ln.strip() for ln in str(exc).splitlines() if "Unpickler error" in ln), _first_line(exc))
            raise CheckpointError(
                f"{path}: refused by torch's weights_only loader (pickled objects other "
                f"than tensors, or a damaged file): {reason[:300]}"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupted?): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _load_strict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str,
    file_names: Mapping[str, str] | None = None,
    wanted_names: Mapping[str, str] | None = None,
    assign: bool = False,
) -> None:
    """Load `state` (diffusers keys) into `model`, refusing missing, unexpected and mis-shaped keys.

    `file_names` / `wanted_names` translate diffusers keys back to the names a user would find in
    (or expect in) the file, so the message can be grepped against the checkpoint.
    """
    file_names = file_names or {}
    wanted_names = wanted_names or {}
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]

    def named(key: str, names: Mapping[str, str]) -> str:
        return f"{names[key]} (diffusers {key})" if key in names and names[key] != key else key

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + _shown([named(k, wanted_names) for k in missing]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _shown([file_names.get(k, k) for k in unexpected]))
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es) [file vs model]: "
            + _shown(
                [f"{named(k, file_names)} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched]
            )
        )
    if problems:
        raise CheckpointError(f"{where}: does not fit {type(model).__name__} as configured: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # CausalWanTransformer3DModel.cast keeps diffusers' fp32 modules (norms, time embedding) in fp32,
    # which a plain .to(dtype) would not.
    return model.cast(dtype) if hasattr(model, "cast") else model.to(dtype)


def load_self_forcing_checkpoint(
    path,
    model_config: dict,
    *,
    key: str = "generator_ema",
    model_cls=CausalWanTransformer3DModel,
    dtype: torch.dtype = torch.float32,
):
    """Build `model_cls(**model_config)` and load a Self-Forcing checkpoint into it, strictly.

    `path` is either Self-Forcing's torch file, a dict whose `key` entry (`"generator_ema"` or
    `"generator"`; never substituted for one another) is an original-layout state dict, or a
    `.safetensors` file holding such a state dict directly (`key` is then unused). Wrapper prefixes
    (`model.`, `module.`, `_fsdp_wrapped_module.`, `_orig_mod.`, ...) are removed, names converted
    with diffusers' Wan conversion, and every key and shape must match the configured model.
    Returns the model in eval mode, cast to `dtype` (fp32 modules kept in fp32).
    """
    path = Path(path)
    payload = _read_weights_file(path)
    if path.suffix == ".safetensors":
        state, where = payload, str(path)
    else:
        if not isinstance(payload, Mapping):
            raise CheckpointError(f"{path}: expected a dict with a {key!r} entry, found a {type(payload).__name__}")
        if key not in payload:
            found = [str(k) for k in payload]
            raise CheckpointError(
                f"{path}: no {key!r} entry (found {_shown(found) if found else 'nothing'}); "
                "choose the entry with model.checkpoint_key"
            )
        state, where = payload[key], f"{path} [{key!r}]"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: expected a state dict, found a {type(state).__name__}")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{where}: entries that are not tensors: {_shown(not_tensors)}")

    names = _diffusers_names(state.keys(), where)
    # Parameters are created on the meta device and then replaced by the file's tensors, already in
    # their final dtype: a 1.3B model built in float32 first would need 5.2 GB for a moment, more than
    # the 2.6 GB its bf16 weights take (three roles share one machine in bench.real_size).
    with parameters_on_meta():
        model = model_cls(**model_config)
    try:
        wanted = {k: SELF_FORCING_PREFIX + v for k, v in original_key_map(model).items()}
    except CheckpointError:
        wanted = {}  # not a plain T2V layout: missing keys are then reported in diffusers names
    dtypes = _target_dtypes(model, dtype)
    state = {new: _as_parameter_data(state[old], dtypes.get(new, dtype)) for new, old in names.items()}
    _load_strict(model, state, where, names, wanted, assign=True)
    return _cast(model, dtype).eval()


@contextlib.contextmanager
def parameters_on_meta():
    """Build a module whose parameters live on the meta device (no memory, no initialisation cost
    beyond one layer at a time), while buffers stay real: Wan's rotary tables are non-persistent
    buffers computed at construction and are not in any checkpoint. Load with `assign=True`."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _as_parameter_data(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The file's tensor itself when it already fits (memory-mapped from a torch file: its pages are
    shared by every process that loads the file, and nothing is copied), else an aligned copy.

    A tensor viewing a safetensors file can sit at an 8-byte offset, which sends the CPU's GEMM down
    another path (same weights, outputs differ in the last bit): such tensors are copied.
    """
    if tensor.dtype == dtype and tensor.is_contiguous() and tensor.data_ptr() % 64 == 0:
        return tensor
    return tensor.to(dtype, copy=True)


def _target_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each state-dict key's dtype after `cast(dtype)`: diffusers' fp32 modules stay float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        name: torch.float32 if keep.intersection(name.split(".")) else dtype
        for name, value in model.state_dict().items()
        if value.is_floating_point()
    }


def save_self_forcing_checkpoint(model: torch.nn.Module, path, key: str = "generator_ema") -> Path:
    """Write `model` as Self-Forcing does: `{key: {"model.<original Wan key>": tensor}}`, atomically.

    The file loads with `load_self_forcing_checkpoint` and with Self-Forcing's own
    `WanDiffusionWrapper.load_state_dict(sd[key])`. Merge LoRA adapters first: only the plain Wan
    parameters have original names (anything else is refused by name).
    """
    names = original_key_map(model)
    state = {SELF_FORCING_PREFIX + names[k]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    torch_save_atomic({key: state}, path)
    return path


# ---------------------------------------------------------------------------------------------
# diffusers directories
# ---------------------------------------------------------------------------------------------


def _check_diffusers_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{what} directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers {what} directory (no config.json)")
    if not any(path.glob("diffusion_pytorch_model*.safetensors")):
        raise CheckpointError(f"{path}: no diffusion_pytorch_model*.safetensors weights")


def _refuse_incomplete(info: Mapping, path: Path, what: str, allow_unexpected: bool = False) -> None:
    # from_pretrained initialises missing weights randomly and only logs it; here that is an error.
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if kind == "unexpected_keys" and allow_unexpected:
            continue
        keys = sorted(str(k) for k in (info.get(kind) or []))
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')}: {_shown(keys)}")
    if info.get("error_msgs"):
        problems.append("; ".join(map(str, info["error_msgs"]))[:500])
    if problems:
        raise CheckpointError(f"{path}: incomplete {what} weights: " + "; ".join(problems))


def load_diffusers_transformer(path, model_cls=CausalWanTransformer3DModel, dtype: torch.dtype = torch.float32):
    """A diffusers `transformer/` directory (config.json + diffusion_pytorch_model*.safetensors).

    `model_cls.from_pretrained(path, torch_dtype=dtype)`, which keeps diffusers' fp32 modules in
    fp32; every weight must be present and fit. Returns the model in eval mode.
    """
    path = Path(path)
    _check_diffusers_dir(path, "transformer")
    try:
        model, info = model_cls.from_pretrained(
            str(path), torch_dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load as {model_cls.__name__}: {_first_line(exc)}") from None
    _refuse_incomplete(info, path, model_cls.__name__)
    return model.eval()


def load_vae(path, dtype: torch.dtype = torch.float32):
    """diffusers' `AutoencoderKLWan` from a local `vae/` directory, in eval mode."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    _check_diffusers_dir(path, "VAE")
    try:
        vae, info = AutoencoderKLWan.from_pretrained(
            str(path), torch_dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load the Wan VAE: {_first_line(exc)}") from None
    _refuse_incomplete(info, path, "AutoencoderKLWan")
    return vae.eval()


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean, std = vae.config.latents_mean, vae.config.latents_std
    if len(mean) != z or len(std) != z:
        raise ValueError(f"VAE config has {len(mean)} latents_mean / {len(std)} latents_std values for z_dim {z}")
    shape = (1, z, 1, 1, 1)
    return (
        torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
        torch.tensor(std, dtype=like.dtype, device=like.device).view(shape),
    )


def _vae_device(vae) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised Wan latents [B, C, F, h, w] -> uint8 RGB frames [B, 1 + 4 (F - 1), 8 h, 8 w, 3] (CPU).

    The generator works in the normalised space ((z - latents_mean) / latents_std, per channel);
    the VAE decodes raw latents, so they are un-normalised first exactly as diffusers' WanPipeline
    does, and the decoder's [-1, 1] output is mapped to 0..255 as its video processor does.
    """
    if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
        raise ValueError(f"latents must be [B, {vae.config.z_dim}, F, h, w], got {tuple(latents.shape)}")
    latents = latents.to(device=_vae_device(vae), dtype=vae.dtype)
    mean, std = _latent_stats(vae, latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]  # [B, 3, F', H, W] in [-1, 1]
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).cpu()


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames [B, F, H, W, 3] -> normalised latents [B, C, 1 + (F - 1) / 4, H / 8, W / 8].

    Takes the posterior's mode (its mean; no sampling), so encoding is deterministic.
    """
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [B, F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    latents = vae.encode(x.to(device=_vae_device(vae), dtype=vae.dtype)).latent_dist.mode()
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def pad_tokens(embeddings: torch.Tensor, length: int) -> torch.Tensor:
    """[n, dim] -> [length, dim], zeros after the n tokens (as Wan pipelines pad prompt embeddings)."""
    return torch.cat([embeddings, embeddings.new_zeros(length - embeddings.shape[0], embeddings.shape[1])])


class TextEncoder:
    """UMT5 prompt embeddings made as Wan pipelines make them, with a per-prompt LRU cache.

    `encode(prompts) -> [B, max_length, dim]`: each prompt is cleaned (diffusers' `prompt_clean`:
    ftfy if installed, HTML unescape, whitespace collapsed), tokenised with `</s>` and padded to
    `max_length` (512, as Wan and Self-Forcing use), encoded with its attention mask, and every
    position after the prompt's own tokens is zero. Prompts longer than `max_length` tokens are
    truncated with a warning.

    Rollouts re-encode the same prompts again and again, so results are cached per cleaned prompt
    (at most `cache_size`, least recently used dropped first). Only each prompt's own tokens are
    kept, a fraction of the padded 512 x 4096 block.
    """

    def __init__(
        self,
        encoder_path,
        tokenizer_path=None,
        *,
        max_length: int = 512,
        cache_size: int = 1024,
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoTokenizer, UMT5EncoderModel

        encoder_path = Path(encoder_path)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else encoder_path
        for what, p in (("text encoder", encoder_path), ("tokenizer", tokenizer_path)):
            if not p.is_dir():
                raise CheckpointError(f"{what} directory not found: {p}")
        if not (encoder_path / "config.json").is_file():
            raise CheckpointError(f"{encoder_path}: not a transformers model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{tokenizer_path}: cannot load the tokenizer: {_first_line(exc)}") from None
        try:
            model, info = UMT5EncoderModel.from_pretrained(str(encoder_path), dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{encoder_path}: cannot load UMT5EncoderModel: {_first_line(exc)}") from None
        # Unused weights are fine (a full encoder-decoder umt5 checkpoint carries a decoder), but a
        # missing one would be random.
        _refuse_incomplete(info, encoder_path, "UMT5EncoderModel", allow_unexpected=True)
        self.model = model.to(device).eval().requires_grad_(False)
        # Embeddings are read as a prefix of each row: padding must go to the right.
        self.tokenizer.padding_side = "right"
        if max_length < 1 or cache_size < 0 or batch_size < 1:
            raise ValueError("max_length and batch_size must be >= 1 and cache_size >= 0")
        self.max_length, self.cache_size, self.batch_size = max_length, cache_size, batch_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @staticmethod
    def _clean(prompt: str) -> str:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return prompt_clean(prompt)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        """Embeddings of each prompt's own tokens, [length_i, dim] on CPU."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]]
        for prompt, n in zip(prompts, lengths, strict=True):
            if n > self.max_length:
                log.warning("prompt truncated from %d to %d tokens: %.80r", n, self.max_length, prompt)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        seq_lens = mask.gt(0).sum(dim=1).tolist()
        # A copy, not a view: a view would keep the whole padded [batch, 512, dim] block alive in the cache.
        return [h[:n].to("cpu", copy=True) for h, n in zip(hidden, seq_lens, strict=True)]

    def token_embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's own tokens' embeddings [length_i, dim] on CPU, through the LRU cache: what
        `encode` pads, and what a prompt-embedding file stores (common/model/prompt_cache.py)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        keys = [self._clean(p) for p in prompts]
        todo = [k for k in dict.fromkeys(keys) if k not in self._cache]
        fresh: dict[str, torch.Tensor] = {}
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            fresh.update(zip(batch, self._encode_uncached(batch), strict=True))
        embeddings = [fresh[k] if k in fresh else self._cache[k] for k in keys]
        for k in keys:  # update the LRU order only after every embedding is taken
            if k in fresh:
                self._cache[k] = fresh[k]
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), max_length, dim] on the encoder's device; zeros after each prompt's tokens."""
        rows = [pad_tokens(emb, self.max_length) for emb in self.token_embeddings(prompts)]
        if not rows:
            return torch.zeros(0, self.max_length, self.dim, dtype=self.model.dtype, device=self.device)
        return torch.stack(rows).to(self.device)


# ---------------------------------------------------------------------------------------------
# What the config names
# ---------------------------------------------------------------------------------------------


def load_policy(config: Config) -> CausalWanTransformer3DModel:
    """The generator the config names: a Self-Forcing checkpoint, a diffusers directory, or (neither
    set) random weights of the configured size, seeded by `model.seed` (benchmarks, tests)."""
    m = config.model
    dtype = getattr(torch, m.dtype)
    if m.self_forcing_checkpoint is not None:
        model = load_self_forcing_checkpoint(
            m.self_forcing_checkpoint, m.transformer.kwargs(), key=m.checkpoint_key, dtype=dtype
        )
    elif m.diffusers_transformer is not None:
        model = load_diffusers_transformer(m.diffusers_transformer, dtype=dtype)
        if model.config.patch_size is not None and tuple(model.config.patch_size) != tuple(m.transformer.patch_size):
            raise CheckpointError(
                f"{m.diffusers_transformer}: patch size {model.config.patch_size} differs from "
                f"model.transformer.patch_size {m.transformer.patch_size}"
            )
    else:
        torch.manual_seed(m.seed)
        model = CausalWanTransformer3DModel(**m.transformer.kwargs()).cast(dtype)
    model = model.to(m.device).eval().requires_grad_(False)
    if m.attention_backend is not None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        # diffusers also makes the backend the process-wide default, which would change every other
        # model of the process (a reward model, a test's); this model's processors carry their own.
        default = _AttentionBackendRegistry.get_active_backend()[0]
        try:
            model.set_attention_backend(m.attention_backend)
        except (RuntimeError, ValueError) as exc:  # diffusers: its package missing or too old
            raise ValueError(f"model.attention_backend={m.attention_backend!r} cannot run here: {exc}") from exc
        finally:
            _AttentionBackendRegistry.set_active_backend(default)
    if m.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: CausalWanTransformer3DModel) -> None:
    """torch.compile each transformer block in place (`nn.Module.compile`: parameter names, state-dict
    keys, adapters and gradient checkpointing are unchanged). Each chunk index, batch and cache
    write/read is its own specialisation of the block (python ints and the cache's layout are guarded
    on), so the recompile limit is raised to hold them all: a full video's forks need a few dozen."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    for block in model.blocks:
        block.compile()


def load_text_encoder(config: Config):
    """An object with `encode(prompts) -> [B, tokens, text_dim]`: UMT5, or the toy world's encoder."""
    m = config.model
    if m.text_encoder_kind == "toy":
        from common.toy.world import ToyTextEncoder

        return ToyTextEncoder(dim=m.transformer.text_dim)
    if m.text_encoder is None:
        raise CheckpointError("model.text_encoder is not set (a local UMT5 encoder directory)")
    return TextEncoder(
        m.text_encoder, m.tokenizer, max_length=m.max_text_tokens, dtype=getattr(torch, m.dtype), device=m.device
    )
