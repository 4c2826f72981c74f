"""Real on-disk formats, with tiny random models: Self-Forcing .pt, diffusers dirs, Wan VAE, UMT5."""

from __future__ import annotations

import logging

import pytest
import torch

from common.causal_wan import CausalWanTransformer3DModel
from common.loading import (
    CheckpointError,
    TextEncoder,
    decode_latents,
    encode_frames,
    load_diffusers_transformer,
    load_self_forcing_checkpoint,
    load_vae,
    save_self_forcing_checkpoint,
    to_diffusers_layout,
    to_original_layout,
)
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def config():
    return tiny_config().model.transformer.kwargs()


@pytest.fixture(scope="module")
def writer(config):
    torch.manual_seed(3)
    return CausalWanTransformer3DModel(**config).eval()


def _forward(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 4, 2, 8, 8, generator=gen), torch.tensor([600.0]), torch.randn(1, 8, 16, generator=gen))


def test_layout_conversion_is_an_exact_inverse(writer):
    state = writer.state_dict()
    original = to_original_layout(state)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.1.cross_attn.norm_k.weight" in original and "blocks.0.norm3.weight" in original
    assert "blocks.0.modulation" in original and "head.modulation" in original
    back = to_diffusers_layout(original)
    assert back.keys() == state.keys()


def test_self_forcing_checkpoint_round_trip(tmp_path, config, writer):
    path = save_self_forcing_checkpoint(writer, tmp_path / "self_forcing.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"generator_ema"}
    assert "model.blocks.0.self_attn.q.weight" in raw["generator_ema"]
    assert "model.head.head.weight" in raw["generator_ema"]
    loaded = load_self_forcing_checkpoint(path, config)
    assert isinstance(loaded, CausalWanTransformer3DModel)
    assert torch.equal(_forward(loaded.eval()), _forward(writer))


def test_wrapper_fragments_are_stripped(tmp_path, config, writer):
    state = {f"model._fsdp_wrapped_module.{k}": v for k, v in to_original_layout(writer.state_dict()).items()}
    torch.save({"generator": state}, tmp_path / "fsdp.pt")
    loaded = load_self_forcing_checkpoint(tmp_path / "fsdp.pt", config, key="generator")
    assert torch.equal(_forward(loaded.eval()), _forward(writer))


def test_original_layout_safetensors(tmp_path, config, writer):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_original_layout(writer.state_dict()).items()}, tmp_path / "w.safetensors")
    loaded = load_self_forcing_checkpoint(tmp_path / "w.safetensors", config)
    assert torch.equal(_forward(loaded.eval()), _forward(writer))


def test_bad_checkpoints_are_refused_with_names(tmp_path, config, writer):
    good = save_self_forcing_checkpoint(writer, tmp_path / "good.pt")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_self_forcing_checkpoint(truncated, config)

    with pytest.raises(CheckpointError, match="not found: .*missing.pt"):
        load_self_forcing_checkpoint(tmp_path / "missing.pt", config)

    with pytest.raises(CheckpointError, match=r"good.pt.*ffn.*shape mismatch|shape mismatch.*ffn"):
        load_self_forcing_checkpoint(good, {**config, "ffn_dim": 48})

    state = torch.load(good, weights_only=True)["generator_ema"]
    extra = dict(state, **{"model.blocks.0.extra_gate.weight": torch.zeros(2)})
    torch.save({"generator_ema": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra_gate"):
        load_self_forcing_checkpoint(tmp_path / "extra.pt", config)

    missing = {k: v for k, v in state.items() if "blocks.1.ffn.2.weight" not in k}
    torch.save({"generator_ema": missing}, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks.1.ffn.net.2.weight"):
        load_self_forcing_checkpoint(tmp_path / "missing_key.pt", config)

    torch.save({"generator": state}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match=r"no_ema.pt: no 'generator_ema' entry \(found \['generator'\]\)"):
        load_self_forcing_checkpoint(tmp_path / "no_ema.pt", config)


def test_pickled_objects_are_not_executed(tmp_path, config):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"generator_ema": Exploit()}))
    with pytest.raises(CheckpointError):
        load_self_forcing_checkpoint(path, config)
    assert not marker.exists()


def test_diffusers_directory(tmp_path, writer):
    writer.save_pretrained(tmp_path / "transformer")
    loaded = load_diffusers_transformer(tmp_path / "transformer")
    assert torch.equal(_forward(loaded.eval()), _forward(writer))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_diffusers_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_diffusers_transformer(tmp_path / "empty")


def test_wan_vae_decode_and_encode(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    latents = torch.randn(1, 4, 2, 8, 8)
    frames = decode_latents(loaded, latents)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 5, 64, 64, 3)
    # Un-normalisation is applied: decoding the raw latents directly differs.
    with torch.no_grad():
        raw = vae.decode(latents, return_dict=False)[0]
    raw_u8 = ((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert not torch.equal(raw_u8, frames)
    assert encode_frames(loaded, frames).shape == (1, 4, 2, 8, 8)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "novae")


@pytest.fixture(scope="module")
def umt5_dirs(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5")
    words = "a red green blue circle square moving left right on black background".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=2, num_layers=1,
                                d_ff=32)).save_pretrained(root / "text_encoder")
    return root


def test_text_encoder_pads_zeroes_caches_and_warns(umt5_dirs, caplog):
    enc = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8)
    calls = []
    enc.model.register_forward_hook(lambda *_: calls.append(1))
    out = enc.encode(["a red circle", "a blue square moving left"])
    assert out.shape == (2, 8, 16)
    assert out[0, 3:].abs().sum() == 0 and out[0, :3].abs().sum() > 0
    assert out[1, 5:].abs().sum() == 0 and out[1, :5].abs().sum() > 0
    again = enc.encode(["a blue square moving left", "a red circle"])
    assert len(calls) == 1
    assert torch.equal(again[0], out[1])
    with caplog.at_level(logging.WARNING):
        enc.encode(["a red circle moving left on a black background a red circle"])
    assert "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder(umt5_dirs / "nope")


def test_load_policy_follows_the_config(tmp_path, writer):
    from common.loading import load_policy, load_text_encoder

    random_policy = load_policy(tiny_config())
    assert not any(p.requires_grad for p in random_policy.parameters())
    save_self_forcing_checkpoint(writer, tmp_path / "sf.pt")
    from_sf = load_policy(tiny_config(f"model.self_forcing_checkpoint={tmp_path / 'sf.pt'}"))
    assert torch.equal(_forward(from_sf), _forward(writer))
    writer.save_pretrained(tmp_path / "dir")
    from_dir = load_policy(tiny_config(f"model.diffusers_transformer={tmp_path / 'dir'}"))
    assert torch.equal(_forward(from_dir), _forward(writer))
    with pytest.raises(CheckpointError, match="model.text_encoder"):
        load_text_encoder(tiny_config())
    toy = load_text_encoder(tiny_config("model.text_encoder_kind=toy"))
    assert toy.encode(["a red circle moving left on a black background"]).shape == (1, 4, 16)
