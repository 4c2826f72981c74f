"""Real on-disk formats with tiny random models: Self-Forcing .pt, diffusers dirs, Wan VAE, UMT5.

Every model here is built from a config with random weights, written in the format the real
weights come in, and loaded back through common.model.loading; nothing is mocked.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from common.config import load_config
from common.model.causal_wan import CausalWanTransformer3DModel
from common.model.loading import (
    CheckpointError,
    TextEncoder,
    decode_latents,
    encode_frames,
    load_diffusers_transformer,
    load_self_forcing_checkpoint,
    load_vae,
    original_key_map,
    save_self_forcing_checkpoint,
    strip_wrapper_prefixes,
    to_diffusers_layout,
    to_original_layout,
)
from tests.conftest import DTYPES, cast_copy, tiny_config


@pytest.fixture(scope="module")
def config() -> dict:
    return tiny_config().model.transformer.kwargs()


@pytest.fixture(scope="module")
def writer(config) -> CausalWanTransformer3DModel:
    torch.manual_seed(3)
    model = CausalWanTransformer3DModel(**config).eval()
    # Random init leaves some tensors at constants (norm weights of 1, zero biases); make every
    # tensor distinct so a swapped pair of keys (e.g. norm2/norm3) would change the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _forward(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=gen)
    text = torch.randn(1, 8, 16, generator=gen)
    dtype = model.compute_dtype
    with torch.no_grad():
        return model(x.to(dtype), torch.tensor([600.0]), text.to(dtype), return_dict=False)[0]


def _assert_cast(model, dtype: torch.dtype) -> None:
    """`dtype` everywhere but diffusers' fp32 modules (norms, time embedding, modulation, rope)."""
    keep = set(model._keep_in_fp32_modules)
    assert {"time_embedder", "scale_shift_table", "norm2"} <= keep
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        assert tensor.dtype == (torch.float32 if keep.intersection(name.split(".")) else dtype), name
    assert model.compute_dtype == dtype


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # state_dict() hands out fresh tensor objects; the same parameter shares storage and shape.
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _original_state(model, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in to_original_layout(model).items()}


# ---------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------


def test_inverse_mapping_is_exact_against_diffusers_conversion(writer):
    state = writer.state_dict()
    original = to_original_layout(writer)
    # Facts of the original Wan layout (Wan2.1 wan/modules/model.py), checked independently of
    # the derivation: the names a Self-Forcing file really uses.
    expected_pairs = {
        "blocks.0.self_attn.q.weight": "blocks.0.attn1.to_q.weight",
        "blocks.1.cross_attn.o.bias": "blocks.1.attn2.to_out.0.bias",
        "blocks.0.cross_attn.norm_k.weight": "blocks.0.attn2.norm_k.weight",
        "blocks.0.norm3.weight": "blocks.0.norm2.weight",  # Wan's norm3 is diffusers' norm2
        "blocks.1.ffn.0.weight": "blocks.1.ffn.net.0.proj.weight",
        "blocks.1.ffn.2.bias": "blocks.1.ffn.net.2.bias",
        "blocks.0.modulation": "blocks.0.scale_shift_table",
        "head.modulation": "scale_shift_table",
        "head.head.weight": "proj_out.weight",
        "patch_embedding.weight": "patch_embedding.weight",
        "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
        "time_embedding.0.bias": "condition_embedder.time_embedder.linear_1.bias",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
    }
    for old, new in expected_pairs.items():
        assert _same(original[old], state[new]), (old, new)
    assert len(original) == len(state)

    # Inverse exactness, with real tensors through diffusers' own function: converting the
    # original-layout dict gives back exactly the model's state dict, key for key, tensor for tensor.
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    assert all(_same(back[k], state[k]) for k in state)
    # And through the loader's path, with Self-Forcing's wrapper prefix.
    assert to_diffusers_layout(_original_state(writer)).keys() == state.keys()


def test_inverse_mapping_covers_the_real_self_forcing_size():
    cfg = load_config("configs/self_forcing_wan1.3b.yaml").model.transformer.kwargs()
    with torch.device("meta"):  # names and shapes only; no 1.3B allocation
        model = CausalWanTransformer3DModel(**cfg)
    names = original_key_map(model)
    assert set(names) == set(model.state_dict())
    assert len(set(names.values())) == len(names)  # a bijection
    assert names["blocks.29.attn2.to_v.weight"] == "blocks.29.cross_attn.v.weight"
    assert sum(k.endswith(".modulation") for k in names.values()) == 31  # 30 blocks + head


def test_saving_refuses_layouts_without_original_names(tmp_path):
    from diffusers import WanTransformer3DModel

    i2v = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        ffn_dim=32,
        num_layers=1,
        image_dim=8,
        added_kv_proj_dim=24,
    )
    with pytest.raises(CheckpointError, match="add_k_proj"):
        save_self_forcing_checkpoint(i2v, tmp_path / "i2v.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "key, short",
    [
        ("model.blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("_orig_mod.model.head.head.bias", "head.head.bias"),
        ("module.model.diffusion_model.head.modulation", "head.modulation"),
        ("patch_embedding.weight", "patch_embedding.weight"),
    ],
)
def test_wrapper_prefixes_are_stripped(key, short):
    assert strip_wrapper_prefixes(key) == short


# ---------------------------------------------------------------------------------------------
# Self-Forcing checkpoints: round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_forcing_checkpoint_round_trip(tmp_path, config, writer, dtype):
    # bf16: the file holds the bf16 model's tensors (diffusers' fp32 modules in float32), and a bf16
    # load gives them back bit for bit.
    writer = cast_copy(writer, dtype)
    path = save_self_forcing_checkpoint(writer, tmp_path / "self_forcing.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["self_forcing.pt"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"generator_ema"}
    stored = raw["generator_ema"]
    assert "model.blocks.0.self_attn.q.weight" in stored and "model.head.head.weight" in stored
    assert "model.blocks.1.norm3.bias" in stored and "model.time_projection.1.weight" in stored
    assert all(k.startswith("model.") for k in stored)
    assert not any(m in k for k in stored for m in ("attn1", "to_q", "scale_shift_table", "proj_out"))
    assert torch.equal(stored["model.blocks.0.self_attn.q.weight"], writer.blocks[0].attn1.to_q.weight)
    assert stored["model.blocks.0.self_attn.q.weight"].dtype == dtype
    assert stored["model.head.modulation"].dtype == stored["model.time_embedding.0.weight"].dtype == torch.float32

    loaded = load_self_forcing_checkpoint(path, config, dtype=dtype)
    assert type(loaded) is CausalWanTransformer3DModel and not loaded.training
    _assert_cast(loaded, dtype)
    assert torch.equal(_forward(loaded), _forward(writer))
    for k, v in writer.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype and torch.equal(loaded.state_dict()[k], v), k


def test_generator_key_and_dtype(tmp_path, config, writer):
    path = save_self_forcing_checkpoint(writer, tmp_path / "plain.pt", key="generator")
    assert set(torch.load(path, weights_only=True)) == {"generator"}
    loaded = load_self_forcing_checkpoint(path, config, key="generator", dtype=torch.bfloat16)
    # diffusers' fp32 modules stay fp32; the rest is cast.
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded.scale_shift_table.dtype == torch.float32
    assert loaded.blocks[0].norm2.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, writer.blocks[0].attn1.to_q.weight.bfloat16())


def test_save_overwrites_atomically(tmp_path, writer, monkeypatch):
    path = save_self_forcing_checkpoint(writer, tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_self_forcing_checkpoint(writer, path)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and the temp file is gone


def test_legacy_torch_format(tmp_path, config, writer):
    torch.save({"generator_ema": _original_state(writer)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = load_self_forcing_checkpoint(tmp_path / "old.pt", config)
    assert torch.equal(_forward(loaded), _forward(writer))


def test_fsdp_and_compile_fragments(tmp_path, config, writer):
    state = {
        f"model._fsdp_wrapped_module.{k}".replace(".blocks.1.", ".blocks.1._orig_mod."): v
        for k, v in to_original_layout(writer).items()
    }
    assert any("_orig_mod" in k for k in state)
    torch.save({"generator": state, "generator_ema": {}}, tmp_path / "fsdp.pt")
    loaded = load_self_forcing_checkpoint(tmp_path / "fsdp.pt", config, key="generator")
    assert torch.equal(_forward(loaded), _forward(writer))


@pytest.mark.parametrize("prefix", ["", "model."])
def test_original_layout_safetensors(tmp_path, config, writer, prefix):
    from safetensors.torch import save_file

    save_file(_original_state(writer, prefix), tmp_path / "w.safetensors")
    loaded = load_self_forcing_checkpoint(tmp_path / "w.safetensors", config)
    assert torch.equal(_forward(loaded), _forward(writer))


# ---------------------------------------------------------------------------------------------
# Self-Forcing checkpoints: refusals, each naming the file and the key
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def good(tmp_path, writer):
    return save_self_forcing_checkpoint(writer, tmp_path / "good.pt")


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_truncated_file(tmp_path, config, good):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(cut, config)
    assert str(cut) in _message(exc) and "corrupted" in _message(exc)


def test_truncated_safetensors(tmp_path, config, writer):
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    save_file(_original_state(writer), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_self_forcing_checkpoint(path, config)


def test_missing_file(tmp_path, config):
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(tmp_path / "nowhere.pt", config)
    assert "not found" in _message(exc) and str(tmp_path / "nowhere.pt") in _message(exc)


def test_wrong_architecture_names_the_shapes(config, good):
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(good, {**config, "ffn_dim": 48})
    msg = _message(exc)
    assert str(good) in msg and "shape mismatch" in msg
    assert "model.blocks.0.ffn.0.weight" in msg and "(32, 24) vs (48, 24)" in msg


def test_unexpected_key(tmp_path, config, good):
    state = torch.load(good, weights_only=True)["generator_ema"]
    state["model.blocks.0.extra_gate.weight"] = torch.zeros(2)
    torch.save({"generator_ema": state}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(tmp_path / "extra.pt", config)
    msg = _message(exc)
    assert "extra.pt" in msg and "1 unexpected key(s): model.blocks.0.extra_gate.weight" in msg
    assert "missing" not in msg


def test_missing_key(tmp_path, config, good):
    state = torch.load(good, weights_only=True)["generator_ema"]
    del state["model.blocks.1.ffn.2.weight"]
    torch.save({"generator_ema": state}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(tmp_path / "short.pt", config)
    msg = _message(exc)
    assert "short.pt" in msg and "1 missing key(s): model.blocks.1.ffn.2.weight" in msg


def test_missing_generator_ema_does_not_fall_back(tmp_path, config, good):
    state = torch.load(good, weights_only=True)["generator_ema"]
    torch.save({"generator": state, "critic": {}}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError) as exc:
        load_self_forcing_checkpoint(tmp_path / "no_ema.pt", config)
    msg = _message(exc)
    assert "no_ema.pt" in msg and "no 'generator_ema' entry" in msg and "generator, critic" in msg


def test_bare_state_dict_and_non_tensors(tmp_path, config, good):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="tensor.pt: expected a dict with a 'generator_ema' entry"):
        load_self_forcing_checkpoint(tmp_path / "tensor.pt", config)
    state = torch.load(good, weights_only=True)["generator_ema"]
    state["model.step"] = 7
    torch.save({"generator_ema": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd.pt \['generator_ema'\]: entries that are not tensors: model.step"):
        load_self_forcing_checkpoint(tmp_path / "odd.pt", config)


def test_diffusers_layout_in_a_torch_file_is_refused(tmp_path, config, writer):
    torch.save({"generator_ema": {f"model.{k}": v for k, v in writer.state_dict().items()}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"d.pt.*diffusers layout.*model\.") as exc:
        load_self_forcing_checkpoint(tmp_path / "d.pt", config)
    assert "load_diffusers_transformer" in _message(exc)


def test_duplicate_keys_after_stripping(tmp_path, config, writer):
    state = _original_state(writer)
    state["head.head.bias"] = state["model.head.head.bias"].clone()
    torch.save({"generator_ema": state}, tmp_path / "dup.pt")
    with pytest.raises(CheckpointError, match="dup.pt.*'model.head.head.bias' and 'head.head.bias'"):
        load_self_forcing_checkpoint(tmp_path / "dup.pt", config)


def test_pickled_objects_are_not_executed(tmp_path, config):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:  # torch.save pickles with the default (non-weights-only) pickler
        torch.save({"generator_ema": Exploit()}, f)
    with pytest.raises(CheckpointError, match="evil.pt: refused by torch's weights_only loader"):
        load_self_forcing_checkpoint(path, config)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"generator_ema": Exploit()}))  # a plain pickle file, too
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_self_forcing_checkpoint(path, config)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# diffusers directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusers_directory_round_trip(tmp_path, writer, dtype):
    writer = cast_copy(writer, dtype)  # bf16: saved as bf16 (and float32 for diffusers' fp32 modules)
    writer.save_pretrained(tmp_path / "transformer")
    loaded = load_diffusers_transformer(tmp_path / "transformer", dtype=dtype)
    assert type(loaded) is CausalWanTransformer3DModel
    _assert_cast(loaded, dtype)
    assert torch.equal(_forward(loaded), _forward(writer))
    half = load_diffusers_transformer(tmp_path / "transformer", dtype=torch.bfloat16)
    assert half.proj_out.weight.dtype == torch.bfloat16 and half.scale_shift_table.dtype == torch.float32


def test_diffusers_directory_refusals(tmp_path, writer):
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match=f"directory not found: {tmp_path / 'nowhere'}"):
        load_diffusers_transformer(tmp_path / "nowhere")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(CheckpointError, match="no_config: not a diffusers transformer directory .no config.json"):
        load_diffusers_transformer(tmp_path / "no_config")
    writer.save_pretrained(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no_weights: no diffusion_pytorch_model"):
        load_diffusers_transformer(tmp_path / "no_weights")

    # diffusers itself would fill a missing weight with random values and only log it.
    writer.save_pretrained(tmp_path / "holey")
    weights = tmp_path / "holey" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["blocks.1.ffn.net.2.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holey: incomplete .* 1 missing keys: blocks.1.ffn.net.2.weight"):
        load_diffusers_transformer(tmp_path / "holey")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="broken: cannot load"):
        load_diffusers_transformer(tmp_path / "broken")


# ---------------------------------------------------------------------------------------------
# Wan VAE
# ---------------------------------------------------------------------------------------------


# vae_dir (tests/conftest.py): a tiny random Wan VAE on disk, and the model it was saved from.


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


@pytest.mark.parametrize(
    "latent_frames, frames, dtype",
    [(1, 1, torch.float32), (2, 5, torch.float32), (3, 9, torch.float32), (2, 5, torch.bfloat16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_decode_latents(vae_dir, latent_frames, frames, dtype):
    path, reference = vae_dir
    vae = load_vae(path, dtype=dtype)
    assert {p.dtype for p in vae.parameters()} == {dtype}
    latents = torch.randn(1, 4, latent_frames, 8, 8, generator=torch.Generator().manual_seed(latent_frames))
    out = decode_latents(vae, latents)
    assert out.dtype == torch.uint8 and out.shape == (1, frames, 64, 64, 3)  # 1 + 4 (F - 1) frames, 8x
    # Un-normalised as WanPipeline does (z = latents * std + mean) before the VAE decodes.
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = _to_uint8(reference.decode(latents * std + mean, return_dict=False)[0])
        unscaled = _to_uint8(reference.decode(latents, return_dict=False)[0])
    if dtype == torch.float32:
        assert torch.equal(out, expected)
        assert not torch.equal(out, unscaled)
    else:
        # bf16 rounds the decoder's activations to 8 bits: measured at most 3 of 255 levels off, 0.3 on
        # average. Latents decoded without un-normalising are 4-6 levels off on average (up to 90).
        diff = (out.int() - expected.int()).abs()
        assert diff.max() <= 4 and diff.float().mean() < 1
        assert (out.int() - unscaled.int()).abs().float().mean() > 2


def test_encode_frames(vae_dir):
    path, reference = vae_dir
    vae = load_vae(path)
    frames = torch.randint(0, 256, (1, 5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    latents = encode_frames(vae, frames)
    assert latents.shape == (1, 4, 2, 8, 8)
    with torch.no_grad():
        dist = reference.encode(frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1).latent_dist
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (dist.mean - mean) / std)  # the mode, normalised
    assert decode_latents(vae, latents).shape == frames.shape
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(vae, frames.float())


def test_vae_refusals(tmp_path, vae_dir):
    from safetensors.torch import load_file, save_file

    path, reference = vae_dir
    with pytest.raises(CheckpointError, match="VAE directory not found: .*novae"):
        load_vae(tmp_path / "novae")
    reference.save_pretrained(tmp_path / "holey")
    weights = tmp_path / "holey" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"holey: incomplete .*missing keys: {dropped}"):
        load_vae(tmp_path / "holey")


# ---------------------------------------------------------------------------------------------
# UMT5 text encoder
# ---------------------------------------------------------------------------------------------


# umt5_dirs (tests/conftest.py): a tiny random UMT5 encoder and word-level tokenizer on disk.


def _counted(enc: TextEncoder) -> list:
    calls: list = []
    enc.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_text_encoder_pads_with_zeros_like_wan(umt5_dirs):
    enc = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8)
    prompts = ["a red circle", "a blue square moving left"]  # 3 and 5 words, + </s>
    out = enc.encode(prompts)
    assert out.shape == (2, 8, 16) and out.dtype == torch.float32
    for row, n in zip(out, (4, 6), strict=True):
        assert (row[:n].abs().sum(-1) > 0).all()
        assert torch.equal(row[n:], torch.zeros(8 - n, 16))
    # The kept positions are each prompt's own tokens, in order: the encoder run on the prompt alone,
    # unpadded, gives the same embeddings (the mask hides the padding, as in WanPipeline).
    for row, prompt in zip(out, prompts, strict=True):
        ids = torch.tensor([enc.tokenizer(prompt)["input_ids"]])
        assert ids[0, -1].item() == 1  # </s> appended
        with torch.no_grad():
            alone = enc.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        torch.testing.assert_close(row[: ids.shape[1]], alone)
    # A prompt's embedding does not depend on the batch it was encoded in.
    alone = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8, cache_size=0)
    torch.testing.assert_close(alone.encode(["a red circle"])[0], out[0])


def test_text_encoder_caches(umt5_dirs):
    enc = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8, cache_size=2)
    calls = _counted(enc)
    first = enc.encode(["a red circle", "a blue square moving left", "a red circle"])
    assert len(calls) == 1 and torch.equal(first[0], first[2])
    again = enc.encode(["a blue square moving left", "  a red   circle "])  # same prompts once cleaned
    assert len(calls) == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    # LRU with room for 2: a third prompt evicts the least recently used ("a blue square ...").
    enc.encode(["a green square", "a red circle"])
    assert len(calls) == 2
    enc.encode(["a red circle", "a green square"])
    assert len(calls) == 2
    assert torch.equal(enc.encode(["a blue square moving left"])[0], first[1])
    assert len(calls) == 3


def test_text_encoder_warns_on_truncation(umt5_dirs, caplog):
    enc = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8)
    with caplog.at_level(logging.WARNING, logger="common.model.loading"):
        short = enc.encode(["a red circle moving left"])
    assert "truncated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="common.model.loading"):
        out = enc.encode(["a red circle moving left on a black background a red circle"])
    assert "truncated from 13 to 8 tokens" in caplog.text
    assert out.shape == (1, 8, 16) and (out[0].abs().sum(-1) > 0).all()
    assert short.shape == (1, 8, 16)


def test_text_encoder_refusals(tmp_path, umt5_dirs):
    from safetensors.torch import load_file, save_file
    from transformers import UMT5EncoderModel

    with pytest.raises(CheckpointError, match=f"text encoder directory not found: {tmp_path / 'nope'}"):
        TextEncoder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="tokenizer directory not found: .*notok"):
        TextEncoder(umt5_dirs / "text_encoder", tmp_path / "notok")
    # transformers, too, would fill a missing weight with random values and only log it.
    UMT5EncoderModel.from_pretrained(umt5_dirs / "text_encoder").save_pretrained(tmp_path / "holey")
    weights = tmp_path / "holey" / "model.safetensors"
    state = load_file(weights)
    del state["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holey: incomplete .*DenseReluDense.wo.weight"):
        TextEncoder(tmp_path / "holey", umt5_dirs / "tokenizer")


# ---------------------------------------------------------------------------------------------
# What the config names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_policy_follows_the_config(tmp_path, writer, dtype):
    from common.model.loading import load_policy, load_text_encoder

    model_dtype = f"model.dtype={str(dtype).removeprefix('torch.')}"
    # Float32 files loaded as model.dtype says: the very model `cast` makes of the writer.
    expected = _forward(cast_copy(writer, dtype))
    random_policy = load_policy(tiny_config(model_dtype))
    assert not any(p.requires_grad for p in random_policy.parameters())
    _assert_cast(random_policy, dtype)
    save_self_forcing_checkpoint(writer, tmp_path / "sf.pt")
    from_sf = load_policy(tiny_config(f"model.self_forcing_checkpoint={tmp_path / 'sf.pt'}", model_dtype))
    _assert_cast(from_sf, dtype)
    assert torch.equal(_forward(from_sf), expected)
    writer.save_pretrained(tmp_path / "dir")
    from_dir = load_policy(tiny_config(f"model.diffusers_transformer={tmp_path / 'dir'}", model_dtype))
    _assert_cast(from_dir, dtype)
    assert torch.equal(_forward(from_dir), expected)
    with pytest.raises(CheckpointError, match="model.text_encoder"):
        load_text_encoder(tiny_config())
    toy = load_text_encoder(tiny_config("model.text_encoder_kind=toy"))
    assert toy.encode(["a red circle moving left on a black background"]).shape == (1, 4, 16)
