"""The causal model against diffusers' WanTransformer3DModel and against its own full-sequence mode."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from common.causal_wan import CausalWanTransformer3DModel, KVCache, block_causal_mask
from tests.conftest import make_sampler, tiny_config


def test_single_chunk_without_cache_matches_diffusers_exactly(tiny_model):
    reference = WanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval()
    reference.load_state_dict(tiny_model.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)
    t = torch.tensor([937.5, 250.0])
    text = torch.randn(2, 8, 16, generator=gen)
    with torch.no_grad():
        expected = reference(x, t, text, return_dict=False)[0]
        got = tiny_model(x, t, text)
    assert torch.equal(got, expected)


def test_state_dict_is_diffusers_layout(tiny_model):
    reference = WanTransformer3DModel(**tiny_config().model.transformer.kwargs())
    assert tiny_model.state_dict().keys() == reference.state_dict().keys()


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


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("window", [None, (4, 0), (4, 2)])
def test_streaming_with_cache_equals_block_causal_full_forward(tiny_model, num_chunks, window):
    overrides = [f"sampler.num_chunks={num_chunks}"]
    if window is not None:
        overrides += [f"sampler.local_attn_frames={window[0]}", f"sampler.sink_frames={window[1]}"]
    err, video = _streamed_vs_full(tiny_model, overrides)
    assert err < 1e-4
    # Whole rollouts, where rounding differences can compound from chunk to chunk, agree too.
    sampler = make_sampler(tiny_model, *overrides)
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3))
    assert (sampler.generate(text, sampler.noise_plan(11), use_cache=False) - video).abs().max() < 1e-4


def test_local_window_changes_long_videos(tiny_model):
    # Guards the test above against a window that silently does nothing.
    _, full = _streamed_vs_full(tiny_model, ["sampler.num_chunks=5"])
    _, local = _streamed_vs_full(tiny_model, ["sampler.num_chunks=5", "sampler.local_attn_frames=4"])
    f = 2
    assert torch.equal(full[:, :, : 2 * f], local[:, :, : 2 * f])  # window not yet exceeded
    assert (full[:, :, 3 * f :] - local[:, :, 3 * f :]).abs().max() > 1e-3


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(num_frames=4, frames_per_chunk=2, tokens_per_frame=1)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool
    )
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


def test_rotary_positions_follow_the_start_frame(tiny_model):
    # Within one chunk RoPE is shift-invariant (q and k rotate together), so the offset shows only
    # against cached earlier frames: a chunk placed at the wrong frame attends differently.
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randn(1, 4, 2, 8, 8, generator=gen), torch.randn(1, 4, 2, 8, 8, generator=gen)
    text, t = torch.randn(1, 8, 16, generator=gen), torch.tensor([500.0])
    cache = tiny_model.new_cache(8, 8)
    with torch.no_grad():
        tiny_model(first, torch.zeros(1), text, start_frame=0, cache=cache, write_cache=True)
        right = tiny_model(second, t, text, start_frame=2, cache=cache)
        wrong = tiny_model(second, t, text, start_frame=6, cache=cache)
        alone_at0 = tiny_model(second, t, text, start_frame=0)
        alone_at6 = tiny_model(second, t, text, start_frame=6)
    assert (right - wrong).abs().max() > 1e-4
    assert (alone_at0 - alone_at6).abs().max() < 1e-5


def test_grad_reaches_cross_attention_through_a_cached_forward(tiny_model):
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
    assert all(not c.keys[0].requires_grad for c in cache.chunks)
    tiny_model.zero_grad()


def test_bad_timestep_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(torch.randn(1, 4, 2, 8, 8), torch.zeros(1, 3), torch.randn(1, 8, 16))
