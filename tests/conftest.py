"""Shared fixtures: a tiny causal Wan of the real architecture, with random weights, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from common.config import load_config
from common.model.causal_wan import CausalWanTransformer3DModel
from common.model.sampler import StreamingSampler

TINY = "configs/tiny.yaml"


def tiny_config(*overrides: str):
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="session")
def tiny_model() -> CausalWanTransformer3DModel:
    torch.manual_seed(0)
    cfg = tiny_config()
    return CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).eval()


def make_sampler(model, *overrides: str) -> StreamingSampler:
    return StreamingSampler.from_config(model, tiny_config(*overrides))


# The real config runs the model in bfloat16 (model.dtype). Tests that exercise the model run in both
# dtypes: `@pytest.mark.parametrize("dtype", DTYPES)` with `tiny_model_in(dtype)` or `cast_copy`.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 relative, and a value in [1, 2)
# (the tiny model's flow predictions stay below 2) is stored to one unit in the last place of 2^-7.
# bf16 twins state their tolerances in this unit.
BF16_ULP = 2**-7


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a (causal or diffusers) Wan transformer cast as `model.dtype` casts it: `dtype`
    everywhere but diffusers' `_keep_in_fp32_modules`, which stay float32."""
    return CausalWanTransformer3DModel.cast(copy.deepcopy(model), dtype)


@pytest.fixture(scope="session")
def tiny_model_bf16(tiny_model) -> CausalWanTransformer3DModel:
    """`tiny_model` cast to bfloat16 (same weights, rounded)."""
    return cast_copy(tiny_model, torch.bfloat16)


@pytest.fixture()
def tiny_model_in(tiny_model, tiny_model_bf16):
    """`tiny_model_in(dtype)`: the session's tiny model in float32, or its bf16 cast."""
    return {torch.float32: tiny_model, torch.bfloat16: tiny_model_bf16}.__getitem__


@pytest.fixture()
def text() -> torch.Tensor:
    return torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """(path, model): a tiny random Wan VAE (z_dim 4, as configs/tiny.yaml's channels) saved as a
    diffusers `vae/` directory, and the model it was saved from."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    ).eval()
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path, vae


def make_umt5_dirs(root, seed: int = 0):
    """A tiny random UMT5 encoder (d_model 16, as configs/tiny.yaml's text_dim) in `root/text_encoder`
    and a word-level tokenizer in `root/tokenizer`, in the formats the real ones come in."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a red green blue circle square moving left right on black background".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 tokenizers append </s> to every prompt; so does this one.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(seed)
    UMT5EncoderModel(
        UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32)
    ).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="session")
def umt5_dirs(tmp_path_factory):
    return make_umt5_dirs(tmp_path_factory.mktemp("umt5"))
