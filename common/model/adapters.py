"""Named LoRA adapters on the policy, through peft as diffusers integrates it (docs/method.md sections 3-5).

Two adapters live side by side on one base model: `on_policy` (trained on fresh forked groups) and
`semi` (trained on the fixed reference buffer). Which of them is active decides the policy:

    reference policy pi_ref     base, adapters disabled          `reference_policy(model)`
    training one adapter        only that adapter active         `train_adapter(model, name)`
    inference (merged)          W_base + dW_semi + s * dW_on     `merge_adapters(model, s)`

Adapters are saved in the safetensors layout diffusers' Wan LoRA loaders read
(`pytorch_lora_weights.safetensors`, keys prefixed `transformer.`, rank/alpha in the metadata), so
`WanPipeline.load_lora_weights(dir)` or `transformer.load_lora_adapter(dir)` picks them up.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from common.durable import fsync_file, replace_directory

ON_POLICY = "on_policy"
SEMI = "semi"
ADAPTERS = (ON_POLICY, SEMI)
LORA_FILE = "pytorch_lora_weights.safetensors"


class AdapterError(ValueError):
    """A missing, unknown or incompatible adapter; the message names it (and the file)."""


def add_adapters(model, rank: int, alpha: float, target_modules: list[str], names=ADAPTERS) -> None:
    """Attach fresh adapters (B = 0, so the policy starts equal to the base) and leave them disabled."""
    for name in names:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first; two named adapters are the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(
                LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True),
                adapter_name=name,
            )
    keep_adapters_in_fp32(model)
    model.disable_adapters()


def keep_adapters_in_fp32(model) -> None:
    """LoRA weights are master weights: float32 whatever the base dtype. peft creates them in the
    base's dtype, and in bf16 an AdamW step of lr 1e-5 on a weight of size 0.025 (bf16 spacing
    1.2e-4 there) rounds away, so a bf16 run would silently not learn. peft casts each layer's
    input to the adapter's dtype and the sum back to the base's, so the base stays bf16."""
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()


def _check(model, *names: str) -> None:
    known = set(getattr(model, "peft_config", {}) or {})
    missing = [n for n in names if n not in known]
    if missing:
        raise AdapterError(f"unknown adapter(s) {missing}; the model has {sorted(known)}")


def adapter_parameters(model, name: str) -> list[torch.nn.Parameter]:
    _check(model, name)
    suffix = f".{name}.weight"
    return [p for n, p in model.named_parameters() if "lora_" in n and n.endswith(suffix)]


def train_adapter(model, name: str) -> list[torch.nn.Parameter]:
    """Make `name` the only active adapter, trainable, everything else frozen; return its parameters."""
    _check(model, name)
    model.enable_adapters()
    model.set_adapters([name], [1.0])
    model.requires_grad_(False)
    params = adapter_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    return params


def use_adapter(model, name: str) -> None:
    """Only `name` active, at scale 1, for sampling (no gradients touched). The scale is set, not
    assumed: merge_adapters leaves the on-policy adapter at its merge scale, and a policy asked for
    "on-policy alone" after a sweep must not run at the sweep's last scale."""
    _check(model, name)
    model.enable_adapters()
    model.set_adapters([name], [1.0])


def merge_adapters(model, scale: float, semi: str = SEMI, on_policy: str = ON_POLICY) -> None:
    """W = W_base + dW_semi + scale * dW_on (docs/method.md section 5), applied on the fly by peft."""
    _check(model, semi, on_policy)
    model.enable_adapters()
    model.set_adapters([semi, on_policy], [1.0, scale])


@contextlib.contextmanager
def reference_policy(model) -> Iterator[None]:
    """pi_ref: the base weights, every adapter bypassed; restores the adapter state afterwards."""
    was_enabled = _adapters_enabled(model)
    model.disable_adapters()
    try:
        yield
    finally:
        if was_enabled:
            model.enable_adapters()


def _adapters_enabled(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return not module.disable_adapters
    return False


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """A snapshot of the adapter's tensors, keyed without the adapter name (what weight sync and
    saving ship). Cloned: peft returns the live parameters, which later training would change."""
    _check(model, name)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def load_adapter_state_dict(model, name: str, state: dict[str, torch.Tensor]) -> None:
    """Overwrite adapter `name` in place; refuses keys or shapes that do not fit."""
    _check(model, name)
    expected = adapter_state_dict(model, name)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterError(
            f"adapter {name!r}: missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise AdapterError(f"adapter {name!r}: shape mismatch (key, given, expected) {wrong[:3]}")
    set_peft_model_state_dict(model, state, adapter_name=name)


def save_adapter(model, name: str, directory: str | Path) -> Path:
    """Write adapter `name` as diffusers' Wan LoRA file into `directory`, atomically."""
    _check(model, name)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        layers = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
        WanLoraLoaderMixin.save_lora_weights(
            tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config
        )
        fsync_file(tmp / LORA_FILE)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / LORA_FILE


def load_adapter(model, directory: str | Path, name: str) -> None:
    """Load a saved adapter (ours or any diffusers Wan LoRA) as adapter `name`, replacing it if present."""
    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise AdapterError(f"no LoRA file at {path}")
    if name in (getattr(model, "peft_config", {}) or {}):
        model.delete_adapters(name)
    try:
        model.load_lora_adapter(str(directory), weight_name=LORA_FILE, prefix="transformer", adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(f"{path}: cannot load as adapter {name!r}: {exc}") from exc
    keep_adapters_in_fp32(model)
    # peft made the adapter in the base's dtype and rounded the file's float32 weights into it (bf16:
    # 8 significant bits); now that it is float32, it takes the file's values again, exactly.
    from safetensors.torch import load_file

    exact = {k.removeprefix("transformer."): v for k, v in load_file(path).items() if k.startswith("transformer.")}
    if exact.keys() == get_peft_model_state_dict(model, adapter_name=name).keys():
        set_peft_model_state_dict(model, exact, adapter_name=name)
