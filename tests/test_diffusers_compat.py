"""The causal model as diffusers' own Wan transformer checks see it, and in diffusers' language.

Our re-statement (not a copy) of what diffusers' test suite checks of WanTransformer3DModel, with
the class replaced by CausalWanTransformer3DModel: diffusers' keywords and return convention, output
shape, determinism, save/load round trip, gradient checkpointing, LoRA through peft, dtype casting,
attention processors and backends, fused QKV projections, and a stock WanPipeline run. Tiny config.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig

from common.model.causal_wan import CausalWanAttnProcessor, CausalWanTransformer3DModel
from tests.conftest import BF16_ULP, DTYPES, cast_copy, tiny_config

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _kwargs(**overrides):
    return {**tiny_config().model.transformer.kwargs(), **overrides}


def _perturbed(seed: int = 0, **overrides) -> CausalWanTransformer3DModel:
    """A tiny causal model whose every weight is random (fresh norms are 1 and hide mistakes)."""
    torch.manual_seed(seed)
    model = CausalWanTransformer3DModel(**_kwargs(**overrides)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _reference(model) -> WanTransformer3DModel:
    """diffusers' own model with the same weights and dtypes."""
    ref = WanTransformer3DModel(**dict(model.config)).eval()
    ref.load_state_dict(model.state_dict())
    return CausalWanTransformer3DModel.cast(ref, model.compute_dtype)


def _inputs(dtype=torch.float32, frames: int = 2, size: int = 16, batch: int = 1) -> dict[str, torch.Tensor]:
    """Inputs as diffusers' Wan tests build them: keyword arguments of `forward`."""
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, frames, size, size, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(batch, 12, 16, generator=gen).to(dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
    }


def _out(model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(model.patch_embedding.weight.dtype), return_dict=False, **extra)[0]


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    # set_attention_backend also sets diffusers' process-wide active backend.
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


# -- diffusers' keywords and return convention -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_takes_diffusers_keywords_and_returns_its_output(dtype):
    model = cast_copy(_perturbed(), dtype)
    reference = _reference(model)
    inputs = _inputs(dtype)
    with torch.no_grad():
        out = model(**inputs, encoder_hidden_states_image=None, attention_kwargs=None)
        tup = model(**inputs, return_dict=False)
        expected = reference(**inputs, return_dict=False)[0]
    assert isinstance(out, Transformer2DModelOutput)
    assert out.sample.shape == inputs["hidden_states"].shape and out.sample.dtype == dtype
    assert torch.equal(out["sample"], out.sample)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)
    # One chunk, no cache: diffusers' output bit for bit.
    assert torch.equal(out.sample, expected)
    # Positional, as diffusers' signature allows: (x, t, text, image, return_dict, attention_kwargs).
    with torch.no_grad():
        positional = model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], None, False)
    assert torch.equal(positional[0], expected)


def test_output_is_deterministic():
    model = _perturbed()
    first, second = _out(model), _out(model)
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_image_embeddings_refused_by_a_text_to_video_model():
    model = _perturbed()
    with pytest.raises(ValueError, match="text-to-video"):
        model(**_inputs(), encoder_hidden_states_image=torch.randn(1, 4, 8))


@pytest.mark.parametrize("added_kv", [False, True], ids=["image_tokens", "image_kv"])
def test_image_conditioned_model_matches_diffusers(added_kv):
    # Built with image_dim, the model takes image embeddings as diffusers' Wan I2V does: with image
    # K/V projections (added_kv_proj_dim, Wan2.1 I2V) or as extra context tokens without them.
    # diffusers' processor splits text from image at a fixed 512 text tokens: give it 512.
    dim = 2 * 12
    model = _perturbed(image_dim=8, added_kv_proj_dim=dim if added_kv else None)
    reference = _reference(model)
    gen = torch.Generator().manual_seed(4)
    inputs = {**_inputs(), "encoder_hidden_states": torch.randn(1, 512, 16, generator=gen)}
    image = torch.randn(1, 5, 8, generator=gen)
    with torch.no_grad():
        got = model(**inputs, encoder_hidden_states_image=image, return_dict=False)[0]
        expected = reference(**inputs, encoder_hidden_states_image=image, return_dict=False)[0]
        no_image = model(**inputs, encoder_hidden_states_image=torch.zeros_like(image), return_dict=False)[0]
    assert torch.equal(got, expected)  # bit for bit, as the text-to-video model
    assert (got - no_image).abs().max() > 1e-3  # the image is attended to
    if added_kv:
        with pytest.raises(ValueError, match="encoder_hidden_states_image"):
            model(**inputs)
        # The image K/V are cached with the prompt's and reused by later chunks.
        cache = model.new_cache(16, 16)
        with torch.no_grad():
            model(**inputs, encoder_hidden_states_image=image, cache=cache, write_cache=True)
            later = {**inputs, "encoder_hidden_states_image": image, "return_dict": False, "start_frame": 2}
            first = model(**later, cache=cache)[0]
            again = model(**later, cache=cache)[0]
            fresh = model(**later, cache=_recomputed(model, inputs, image))[0]
        assert all(kv is not None and len(kv) == 4 for kv in cache.text_kv)
        assert torch.equal(first, again) and torch.equal(first, fresh)


def _recomputed(model, inputs, image):
    """A cache holding the same first chunk, but no prompt/image K/V yet."""
    cache = model.new_cache(16, 16)
    with torch.no_grad():
        model(**inputs, encoder_hidden_states_image=image, cache=cache, write_cache=True)
    cache.text_kv = [None] * cache.num_blocks
    return cache


def test_attention_kwargs_scale_weights_lora_for_one_call():
    model = _perturbed()
    base = _out(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    full = _out(model)
    half = _out(model, attention_kwargs={"scale": 0.5})
    off = _out(model, attention_kwargs={"scale": 0.0, "ignored": 1})
    assert (full - base).abs().max() > 1e-3
    assert (off - base).abs().max() < 1e-6  # scale 0: the adapter contributes nothing
    assert (half - full).abs().max() > 1e-4 and (half - base).abs().max() > 1e-4
    assert torch.equal(_out(model), full)  # the scale is undone after the call
    # diffusers' model with the same adapter weighs it alike.
    reference = _reference(_perturbed())
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = reference(**_inputs(), attention_kwargs={"scale": 0.5}, return_dict=False)[0]
    assert torch.equal(half, expected)


# -- save / load, casting, checkpointing, LoRA -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_pretrained_from_pretrained_round_trip(tmp_path, dtype):
    model = cast_copy(_perturbed(), dtype)
    model.save_pretrained(tmp_path)
    loaded = CausalWanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert type(loaded) is CausalWanTransformer3DModel
    private = {k for k in loaded.config if k.startswith("_")} | {k for k in model.config if k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if k not in private} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k not in private
    }
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == {n: t.dtype for n, t in model.state_dict().items()}
    assert all(isinstance(p, CausalWanAttnProcessor) for p in loaded.attn_processors.values())
    assert torch.equal(_out(loaded), _out(model))
    # And diffusers' own class reads the same directory.
    plain = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert torch.equal(_out(plain), _out(model))


def test_to_dtype_and_layerwise_casting():
    model = _perturbed()
    fp32 = _out(model)
    # diffusers' whole-model cast (no fp32-kept modules): runs in bf16, equal to diffusers' bf16.
    half = copy.deepcopy(model).to(torch.bfloat16)
    reference = WanTransformer3DModel(**dict(model.config)).eval()
    reference.load_state_dict(model.state_dict())
    reference = reference.to(torch.bfloat16)
    got = _out(half)
    with torch.no_grad():
        expected = reference(**_inputs(torch.bfloat16), return_dict=False)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert (got.float() - fp32).abs().max() < 8 * BF16_ULP
    # Layerwise casting: bf16 storage, fp32 compute.
    stored = copy.deepcopy(model)
    stored.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert stored.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    out = _out(stored)
    assert out.dtype == torch.float32 and (out - fp32).abs().max() < 8 * BF16_ULP


@pytest.mark.parametrize("mode", ["one_chunk", "block_causal", "cached"])
def test_gradient_checkpointing_gives_the_same_grads(mode):
    plain = _perturbed().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    calls = []
    inner = checkpointed._gradient_checkpointing_func
    checkpointed._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)

    def loss(model):
        inputs = _inputs(frames=4)
        kwargs = {}
        if mode == "block_causal":
            kwargs = {"frames_per_chunk": 2}
        elif mode == "cached":
            cache = model.new_cache(16, 16)
            with torch.no_grad():
                model(**_inputs(), cache=cache, write_cache=True)
            inputs, kwargs = _inputs(), {"start_frame": 2, "cache": cache}
        return model(**inputs, return_dict=False, **kwargs)[0].square().mean()

    loss(plain).backward()
    loss(checkpointed).backward()
    assert len(calls) == len(plain.blocks)  # every block went through checkpointing
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    assert plain.blocks[0].attn2.to_k.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`", "ignore:Adapter other was active")
def test_lora_add_save_unload_load_set_delete(tmp_path):
    model = _perturbed()
    base = _out(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    with_lora = _out(model)
    assert (with_lora - base).abs().max() > 1e-3
    model.save_lora_adapter(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ValueError, match="not found"):
        model.save_lora_adapter(tmp_path / "x", adapter_name="foo")
    model.unload_lora()
    assert torch.equal(_out(model), base)
    model.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True, adapter_name="loaded")
    assert (_out(model) - with_lora).abs().max() < 1e-6
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False), "other")
    model.set_adapters(["other"])
    other = _out(model)
    assert (other - with_lora).abs().max() > 1e-4 and (other - base).abs().max() > 1e-4
    model.delete_adapters(["other"])
    model.set_adapters(["loaded"])
    assert (_out(model) - with_lora).abs().max() < 1e-6
    # The same file drives diffusers' own model to the same output.
    reference = _reference(_perturbed())
    reference.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    with torch.no_grad():
        assert (reference(**_inputs(), return_dict=False)[0] - with_lora).abs().max() < 1e-6


# -- attention processors and backends ----------------------------------------------------------


class _Silenced:
    """A foreign processor that declares it can run the causal cache: it delegates, then zeroes."""

    supports_causal_cache = True

    def __init__(self):
        self.inner, self.calls = CausalWanAttnProcessor(), 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        self.calls += 1
        return 0 * self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def test_causal_processors_installed_at_construction():
    model = CausalWanTransformer3DModel(**_kwargs())
    processors = model.attn_processors
    assert len(processors) == 2 * len(model.blocks)
    assert all(type(p) is CausalWanAttnProcessor for p in processors.values())
    assert len({id(p) for p in processors.values()}) == len(processors)  # one per layer, as diffusers


@pytest.mark.parametrize("processor", [AttnProcessor, WanAttnProcessor])
def test_processor_without_causal_cache_is_refused_by_name(processor):
    model = _perturbed()
    model.set_attn_processor(processor())
    # diffusers' set/get semantics hold: what was set is what the model reports...
    assert all(type(p) is processor for p in model.attn_processors.values())
    # ...and the next forward refuses it loudly instead of quietly putting the causal one back.
    with pytest.raises(TypeError, match=rf"blocks\.0\.attn1\.processor is {processor.__name__}.*causal"):
        model(**_inputs())
    assert all(type(p) is processor for p in model.attn_processors.values())
    model.use_causal_processors()
    assert torch.equal(_out(model), _out(_perturbed()))
    # Set on one layer only, past set_attn_processor: refused too, naming that layer.
    model.blocks[1].attn2.set_processor(processor())
    with pytest.raises(TypeError, match=rf"blocks\.1\.attn2\.processor is {processor.__name__}"):
        model(**_inputs())


def test_processor_that_declares_causal_cache_is_used():
    model = _perturbed()
    silenced = _Silenced()
    model.set_attn_processor(silenced)
    attention_free = _out(model)
    assert silenced.calls == 2 * len(model.blocks)
    assert (attention_free - _out(_perturbed())).abs().max() > 1e-3  # it ran, it was not replaced
    # A dict per layer, as diffusers takes it: a subclass of ours, counting.
    calls = []

    class Counting(CausalWanAttnProcessor):
        def attention(self, q, k, v, mask):
            calls.append(q.shape)
            return super().attention(q, k, v, mask)

    model.set_attn_processor({name: Counting() for name in model.attn_processors})
    assert torch.equal(_out(model), _out(_perturbed())) and len(calls) == 2 * len(model.blocks)


def test_attention_runs_through_diffusers_dispatch_and_chosen_backend(monkeypatch):
    model, expected = _perturbed(), _out(_perturbed())
    calls = {AttentionBackendName.NATIVE: 0, AttentionBackendName._NATIVE_MATH: 0}
    for name in calls:
        fn = _AttentionBackendRegistry._backends[name]

        def spy(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    layers = 2 * len(model.blocks)

    model.set_attention_backend("native")
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in model.attn_processors.values())
    assert torch.equal(_out(model), expected) and calls[AttentionBackendName.NATIVE] == layers
    model.set_attention_backend("_native_math")
    got = _out(model)
    assert calls[AttentionBackendName._NATIVE_MATH] == layers and (got - expected).abs().max() < 1e-5
    # Full-sequence mode's block-causal mask goes through the chosen backend too.
    with torch.no_grad():
        masked = model(**_inputs(frames=4), frames_per_chunk=2, return_dict=False)[0]
    model.reset_attention_backend()
    with torch.no_grad():
        assert (masked - model(**_inputs(frames=4), frames_per_chunk=2, return_dict=False)[0]).abs().max() < 1e-5
    # diffusers' context manager picks the backend of processors left unset.
    before = calls[AttentionBackendName._NATIVE_MATH]
    with attention_backend("_native_math"):
        assert (_out(model) - expected).abs().max() < 1e-5
    assert calls[AttentionBackendName._NATIVE_MATH] == before + layers
    # use_causal_processors keeps a chosen backend.
    model.set_attention_backend("native")
    model.use_causal_processors()
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in model.attn_processors.values())


def test_unknown_backend_is_refused():
    model = _perturbed()
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attention_backend("no_such_backend")
    with pytest.raises(ValueError, match="not registered"), attention_backend("no_such_backend"):
        pass
    assert torch.equal(_out(model), _out(_perturbed()))


def test_backend_that_cannot_mask_is_refused_in_full_sequence_mode():
    # A varlen kernel would reduce the block-causal mask to a key-padding one: silently bidirectional.
    model = _perturbed()
    for processor in model.attn_processors.values():
        processor._attention_backend = AttentionBackendName.FLASH_VARLEN
    with pytest.raises(ValueError, match="'flash_varlen' cannot apply the block-causal mask"):
        model(**_inputs(frames=4), frames_per_chunk=2)


# -- fused QKV projections -------------------------------------------------------------------


def _calls(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _streamed_and_full(model) -> list[torch.Tensor]:
    """Outputs of the three ways the model runs (one chunk, streaming over a cache whose prompt K/V
    the context pass computed, block-causal full sequence), and the cache."""
    dtype = model.compute_dtype
    cache = model.new_cache(16, 16)
    with torch.no_grad():
        one = model(**_inputs(dtype, batch=2), return_dict=False)[0]
        model(**_inputs(dtype), cache=cache, write_cache=True)
        streamed = model(**_inputs(dtype), start_frame=2, cache=cache, return_dict=False)[0]
        full = model(**_inputs(dtype, frames=4), frames_per_chunk=2, return_dict=False)[0]
    return [one, streamed, full, cache]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_projections_are_used_and_match_unfused(dtype):
    model = cast_copy(_perturbed(), dtype)
    *unfused, _ = _streamed_and_full(model)
    model.fuse_qkv_projections()
    attn1, attn2 = model.blocks[0].attn1, model.blocks[0].attn2
    assert attn1.fused_projections and hasattr(attn1, "to_qkv") and hasattr(attn2, "to_kv")
    assert attn1.to_qkv.weight.dtype == dtype
    separate = _calls([attn1.to_q, attn1.to_k, attn1.to_v, attn2.to_k, attn2.to_v])
    fused = _calls([attn1.to_qkv, attn2.to_kv, attn2.to_q])
    *got, cache = _streamed_and_full(model)
    assert separate == [0] * 5  # one matmul for q, k, v; one for the prompt's k, v
    assert fused == [4, 3, 4]  # the streamed pass reuses the prompt K/V the context pass cached
    # The cache holds values of their own size, not views that keep the fused q, k, v alive.
    v = cache.chunks[0].values[0]
    assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    # fp32: float rounding of a different GEMM blocking; bf16: one rounding of the flow, or two.
    tolerance = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
    for a, b in zip(unfused, got, strict=True):
        assert (a.float() - b.float()).abs().max() <= tolerance
    model.unfuse_qkv_projections()
    assert not attn1.fused_projections and not hasattr(attn1, "to_qkv") and not hasattr(attn2, "to_kv")
    *back, _ = _streamed_and_full(model)
    assert all(torch.equal(a, b) for a, b in zip(unfused, back, strict=True))


def test_fusing_with_lora_adapters_is_refused():
    # The fused weight is the base weight only: fusing would silently drop LoRA on to_q/to_k/to_v.
    model = _perturbed()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    with_lora = _out(model)
    with pytest.raises(ValueError, match=r"LoRA adapters on \['to_k', 'to_q', 'to_v'\]"):
        model.fuse_qkv_projections()
    assert not model.blocks[0].attn1.fused_projections and not hasattr(model.blocks[0].attn1, "to_qkv")
    assert torch.equal(_out(model), with_lora)
    # Merged into the base and unloaded, the adapters fuse like any weight.
    model.fuse_lora()
    model.unload_lora()
    model.fuse_qkv_projections()
    assert (_out(model) - with_lora).abs().max() < 1e-5
    # Adapters added after fusing are refused at the next forward.
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), "late")
    with pytest.raises(ValueError, match="fused QKV projections but LoRA adapters"):
        model(**_inputs())


# -- a stock diffusers pipeline ---------------------------------------------------------------


def test_drops_into_a_stock_wan_pipeline(umt5_dirs, vae_dir):
    from transformers import AutoTokenizer, UMT5EncoderModel

    model = _perturbed()
    reference = _reference(model)
    tokenizer = AutoTokenizer.from_pretrained(umt5_dirs / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(umt5_dirs / "text_encoder").eval()

    def run(transformer):
        pipe = WanPipeline(tokenizer, encoder, vae_dir[1], FlowMatchEulerDiscreteScheduler(shift=3.0), transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a red circle moving left",
            negative_prompt="blue square",
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            attention_kwargs={"scale": 1.0},
        ).frames

    got, expected = run(model), run(reference)
    assert got.shape == (1, 4, 2, 4, 4)
    assert torch.equal(got, expected)
