"""The causal model against diffusers' WanTransformer3DModel and against its own full-sequence mode."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from common.model.causal_wan import KVCache, block_causal_mask
from tests.conftest import BF16_ULP, DTYPES, cast_copy, make_sampler, tiny_config


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_chunk_without_cache_matches_diffusers_exactly(tiny_model, tiny_model_in, dtype):
    # In bf16 too: both models cast alike, and our float32 q/k norm (F.rms_norm on upcast input,
    # rounded once) gives the bits of diffusers' RMSNorm on bf16 input.
    reference = WanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval()
    reference.load_state_dict(tiny_model.state_dict())
    reference, model = cast_copy(reference, dtype), tiny_model_in(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)
    t = torch.tensor([937.5, 250.0])
    text = torch.randn(2, 8, 16, generator=gen)
    with torch.no_grad():
        expected = reference(x.to(dtype), t, text.to(dtype), return_dict=False)[0]
        got = model(x.to(dtype), t, text.to(dtype), return_dict=False)[0]
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    # Fresh norm weights are 1, which hides where a norm rounds (a bf16 norm that rounds before its
    # weight is applied is 0.023 off): with every weight perturbed, the bits still agree.
    perturbed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model = cast_copy(perturbed, dtype)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(
            model(x.to(dtype), t, text.to(dtype), return_dict=False)[0],
            reference(x.to(dtype), t, text.to(dtype), return_dict=False)[0],
        )


def test_state_dict_is_diffusers_layout(tiny_model):
    reference = WanTransformer3DModel(**tiny_config().model.transformer.kwargs())
    assert tiny_model.state_dict().keys() == reference.state_dict().keys()


def test_cast_keeps_diffusers_fp32_modules(tiny_model, tiny_model_bf16):
    kept = set(WanTransformer3DModel._keep_in_fp32_modules)
    assert {"time_embedder", "scale_shift_table", "norm2"} <= kept
    tensors = dict(tiny_model_bf16.named_parameters()) | dict(tiny_model_bf16.named_buffers())
    for name, tensor in tensors.items():
        expected = torch.float32 if kept.intersection(name.split(".")) else torch.bfloat16
        assert tensor.dtype == expected, name
    assert tiny_model_bf16.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert tiny_model_bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tiny_model_bf16.compute_dtype == torch.bfloat16 and tiny_model.compute_dtype == torch.float32
    # Same weights, rounded once.
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tiny_model_bf16.state_dict()[name], tensor.to(tensors[name].dtype)), name


def _streamed_vs_full(model, overrides):
    """Largest gap between every streamed x0 prediction and a no-cache block-causal forward over
    the clean earlier chunks plus that chunk's x_t (the context the stream saw)."""
    sampler = make_sampler(model, *overrides)
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3))
    outs = list(sampler.stream(text, sampler.noise_plan(11), record=tuple(range(sampler.num_chunks))))
    video = torch.cat([o.latents for o in outs], dim=2)
    worst = 0.0
    for out in outs:
        for step in range(sampler.scheduler.num_steps):
            with torch.no_grad():
                x0 = sampler.predict_x0_without_cache(out.inputs[:, step], step, out.chunk, text, video)
            worst = max(worst, (x0 - out.predictions[:, step]).abs().max().item())
    return worst, video


_FP32_CASES = [(n, w, torch.float32) for w in [None, (4, 0), (4, 2)] for n in [1, 2, 3, 5]]
# bf16 is slow on CPUs: a cache of earlier chunks, and a sliding window with a sink and eviction.
_BF16_CASES = [(3, None, torch.bfloat16), (5, (4, 2), torch.bfloat16)]


@pytest.mark.parametrize(
    "num_chunks, window, dtype", _FP32_CASES + _BF16_CASES, ids=lambda v: str(v).replace("torch.", "").replace(" ", "")
)
def test_streaming_with_cache_equals_block_causal_full_forward(tiny_model_in, num_chunks, window, dtype):
    tiny_model = tiny_model_in(dtype)
    overrides = [f"sampler.num_chunks={num_chunks}"]
    if window is not None:
        overrides += [f"sampler.local_attn_frames={window[0]}", f"sampler.sink_frames={window[1]}"]
    # bf16: equal here (each token's row of a bf16 GEMM is computed alike whatever the batch, and the
    # masked keys add exact zeros); one ulp of the flow allowed for a rounding that another kernel
    # would take the other way. A timestep rounded to bf16 on one path only makes it 0.05.
    tolerance = 1e-4 if dtype == torch.float32 else BF16_ULP
    err, video = _streamed_vs_full(tiny_model, overrides)
    assert err < tolerance
    # Whole rollouts, where rounding differences can compound from chunk to chunk, agree too.
    sampler = make_sampler(tiny_model, *overrides)
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3))
    assert (sampler.generate(text, sampler.noise_plan(11), use_cache=False) - video).abs().max() < tolerance


def test_local_window_changes_long_videos(tiny_model):
    # Guards the test above against a window that silently does nothing.
    _, full = _streamed_vs_full(tiny_model, ["sampler.num_chunks=5"])
    _, local = _streamed_vs_full(tiny_model, ["sampler.num_chunks=5", "sampler.local_attn_frames=4"])
    f = 2
    assert torch.equal(full[:, :, : 2 * f], local[:, :, : 2 * f])  # window not yet exceeded
    assert (full[:, :, 3 * f :] - local[:, :, 3 * f :]).abs().max() > 1e-3


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(num_frames=4, frames_per_chunk=2, tokens_per_frame=1)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    windowed = block_causal_mask(6, 2, 1, local_attn_frames=2, sink_frames=1)
    # The last chunk (frames 4-5) sees itself and the sink frame 0 only.
    assert windowed[5].tolist() == [True, False, False, False, True, True]
    assert block_causal_mask(2, 1, 3).shape == (6, 6)


def test_visible_frames_and_eviction():
    cache = KVCache(num_blocks=1, tokens_per_frame=1, local_attn_frames=4, sink_frames=1)
    assert cache.visible_frames(0, 2) == []
    assert cache.visible_frames(2, 4) == [(0, 2)]
    assert cache.visible_frames(6, 8) == [(0, 1), (4, 6)]
    for start in range(0, 8, 2):
        chunk = cache.begin_chunk(start, 2)
        chunk.keys[0] = chunk.values[0] = torch.full((1, 2, 1, 1), float(start))
        cache.evict(start + 2, 2)
    # After frames 0..7, the next chunk (8-9) sees the sink (chunk 0) and frames 6-7.
    assert [c.start_frame for c in cache.chunks] == [0, 6]
    k, _ = cache.gather(0, 8, 10)
    assert k.flatten().tolist() == [0.0, 6.0, 6.0]


def test_cache_refuses_out_of_order_writes():
    cache = KVCache(num_blocks=1, tokens_per_frame=1)
    cache.begin_chunk(0, 2)
    with pytest.raises(ValueError, match="in order"):
        cache.begin_chunk(4, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_positions_follow_the_start_frame(tiny_model_in, dtype):
    # Within one chunk RoPE is shift-invariant (q and k rotate together), so the offset shows only
    # against cached earlier frames: a chunk placed at the wrong frame attends differently.
    tiny_model = tiny_model_in(dtype)
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randn(1, 4, 2, 8, 8, generator=gen), torch.randn(1, 4, 2, 8, 8, generator=gen)
    text, t = torch.randn(1, 8, 16, generator=gen), torch.tensor([500.0])
    first, second, text = first.to(dtype), second.to(dtype), text.to(dtype)
    cache = tiny_model.new_cache(8, 8)
    with torch.no_grad():
        tiny_model(first, torch.zeros(1), text, start_frame=0, cache=cache, write_cache=True)
        right = tiny_model(second, t, text, return_dict=False, start_frame=2, cache=cache)[0]
        wrong = tiny_model(second, t, text, return_dict=False, start_frame=6, cache=cache)[0]
        alone_at0 = tiny_model(second, t, text, return_dict=False, start_frame=0)[0]
        alone_at6 = tiny_model(second, t, text, return_dict=False, start_frame=6)[0]
    assert cache.chunks[0].keys[0].dtype == cache.chunks[0].values[0].dtype == right.dtype == dtype
    # bf16: shift-invariant only to rounding, since q and k are rounded to bf16 after a rotation
    # that depends on the frame (measured one ulp); the wrong offset moves the output by six.
    tolerance = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
    assert (right - wrong).abs().max() > max(1e-4, 2 * tolerance)
    assert (alone_at0 - alone_at6).abs().max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_reaches_cross_attention_through_a_cached_forward(tiny_model_in, dtype):
    tiny_model = tiny_model_in(dtype)
    sampler = make_sampler(tiny_model)
    text = torch.randn(1, 8, 16)
    plan = sampler.noise_plan(0)
    cache = sampler.new_cache()
    list(sampler.stream(text, plan, cache=cache, end_chunk=2))  # fills the prompt K/V cache too
    assert all(kv is not None for kv in cache.text_kv)
    tiny_model.zero_grad()
    x0 = sampler.predict_x0(plan.initial(2), 0, 2, text, cache)
    x0.square().mean().backward()
    assert tiny_model.blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
    assert tiny_model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert tiny_model.blocks[0].attn2.to_k.weight.grad.dtype == dtype
    assert tiny_model.condition_embedder.time_embedder.linear_1.weight.grad.dtype == torch.float32
    assert all(not c.keys[0].requires_grad and c.keys[0].dtype == dtype for c in cache.chunks)
    tiny_model.zero_grad()


def test_bad_timestep_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(torch.randn(1, 4, 2, 8, 8), torch.zeros(1, 3), torch.randn(1, 8, 16))


def test_model_compile_compiles_every_block_in_place():
    # model.compile=true: each block compiled where the model is built, state-dict keys unchanged
    # (no `_orig_mod.` prefix: checkpoints, adapters and weight syncs see the same names). Nothing
    # is compiled until the first forward, so this costs no compile time.
    from common.model.loading import load_policy

    eager = load_policy(tiny_config())
    compiled = load_policy(tiny_config("model.compile=true"))
    assert all(block._compiled_call_impl is None for block in eager.blocks)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_one_pass_qk_norm_gives_the_float32_paths_bits(dtype):
    """Rollouts (no grad, CPU) take F.rms_norm on the bf16/fp16 input directly; it must give exactly
    what the explicit float32 path (the one the learner's autograd takes) gives."""
    from common.model.causal_wan import _rms_norm_fp32

    gen = torch.Generator().manual_seed(0)
    for shape, scale in (((12, 192, 256), 1.0), ((1, 64, 96), 40.0), ((3, 5, 128), 0.01)):
        norm = torch.nn.RMSNorm(shape[-1], eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(shape[-1], generator=gen))
        norm = norm.to(dtype)
        x = (scale * torch.randn(shape, generator=gen)).to(dtype)
        explicit = _rms_norm_fp32(norm, x)  # grad enabled: the explicit float32 path
        with torch.no_grad():
            fast = _rms_norm_fp32(norm, x)
        assert fast.dtype == dtype and torch.equal(fast, explicit.detach()), shape
        manual = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).to(
            dtype
        )
        assert (fast.float() - manual.float()).abs().max() <= 2 * torch.finfo(dtype).eps * fast.float().abs().max()
