"""The streaming sampler, the noise plan and forking (docs/method.md sections 1-2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from common.model.noise import BranchNoise
from common.model.scheduler import FewStepFlowScheduler
from tests.conftest import BF16_ULP, DTYPES, make_sampler


def test_self_forcing_schedule():
    sched = FewStepFlowScheduler([1000, 750, 500, 250], shift=5.0)
    assert sched.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    assert sched.timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert sched.context_timestep == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_yields_each_chunk_before_computing_the_next(tiny_model_in, text, dtype):
    model = tiny_model_in(dtype)
    sampler = make_sampler(model)
    calls = []
    # (x_t, timestep, text, output) dtypes of every forward.
    handle = model.register_forward_hook(lambda _, args, out: calls.append((*(a.dtype for a in args), out[0].dtype)))
    try:
        stream = sampler.stream(text, sampler.noise_plan(0))
        first = next(stream)
        # T denoising forwards plus one context pass, nothing of chunk 1 yet.
        assert first.chunk == 0 and len(calls) == sampler.scheduler.num_steps + 1
        rest = list(stream)
    finally:
        handle.remove()
    assert [o.chunk for o in rest] == [1, 2, 3]
    # The last chunk writes no cache: nobody would read it.
    assert len(calls) == 4 * sampler.scheduler.num_steps + 3
    # Activations run in the model's dtype; timesteps stay float32 (in bf16, 937.5 would be 936) for
    # the float32 time embedder; the sampler's own state (latents) stays float32.
    assert set(calls) == {(dtype, torch.float32, dtype, dtype)}
    assert all(o.latents.dtype == torch.float32 for o in [first, *rest])


@pytest.mark.parametrize("dtype", DTYPES)
def test_recorded_trajectory_is_the_consistency_loop(tiny_model_in, text, dtype):
    # Bit for bit in bf16 too: the consistency loop is the scheduler's float32 arithmetic.
    sampler = make_sampler(tiny_model_in(dtype))
    plan = sampler.noise_plan(5)
    out = list(sampler.stream(text, plan, record=(1,)))[1]
    assert out.inputs.dtype == out.predictions.dtype == torch.float32
    sched = sampler.scheduler
    assert torch.equal(out.inputs[:, 0], plan.initial(1))
    for step in range(sched.num_steps - 1):
        expected = sched.renoise(out.predictions[:, step], plan.solver(1, step), step + 1)
        assert torch.equal(out.inputs[:, step + 1], expected)
    assert torch.equal(out.predictions[:, -1], out.latents)


def test_noise_plan_is_deterministic_and_distinct():
    sampler_shape = (4, 2, 8, 8)
    from common.model.noise import NoisePlan

    a, b = NoisePlan((1, 2), sampler_shape), NoisePlan((1, 2), sampler_shape)
    assert torch.equal(a.initial(0), b.initial(0))
    assert a.initial(0).shape == (2, *sampler_shape)
    assert not torch.equal(a.initial(0)[0], a.initial(0)[1])  # per-sample seeds
    assert not torch.equal(a.initial(0), a.initial(1))  # per chunk
    assert not torch.equal(a.solver(0, 0), a.solver(0, 1))  # per step
    assert not torch.equal(a.initial(0), a.solver(0, 0))  # per kind


def test_branch_noise_shares_everything_but_the_pivot_start():
    from common.model.noise import NoisePlan

    plan = NoisePlan((9,), (4, 2, 8, 8))
    noise = BranchNoise(plan, pivot=1, sigma=0.5, fork_seed=3, branches=(0, 1, 2))
    e = noise.initial(1)
    expected = math.sqrt(1 - 0.25) * plan.initial(1) + 0.5 * noise.directions()
    assert torch.equal(e, expected)
    assert not torch.equal(e[0], e[1])
    assert torch.equal(noise.initial(0), plan.initial(0))
    assert torch.equal(noise.initial(2), plan.initial(2))
    assert torch.equal(noise.solver(1, 0), plan.solver(1, 0))
    # Sub-batching keeps each branch's direction.
    later = BranchNoise(plan, pivot=1, sigma=0.5, fork_seed=3, branches=(2,))
    assert torch.equal(later.initial(1)[0], e[2])
    # A neighbour's noise stays roughly unit-variance.
    assert abs(e.std().item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="sigma"):
        BranchNoise(plan, pivot=1, sigma=1.5, fork_seed=3, branches=(0,))


# bf16 at one pivot with chunks on both sides (the edge pivots are not about the dtype).
@pytest.mark.parametrize(
    "pivot, dtype",
    [(0, torch.float32), (2, torch.float32), (3, torch.float32), (2, torch.bfloat16)],
    ids=["0", "2", "3", "2-bf16"],
)
def test_fork_reproduces_prefix_bit_for_bit(tiny_model_in, text, pivot, dtype):
    sampler = make_sampler(tiny_model_in(dtype))
    plan = sampler.noise_plan(21)
    unforked = sampler.generate(text, plan)
    group = sampler.fork(text, plan, pivot=pivot, group_size=5, sigma=0.5, fork_seed=4)
    f = sampler.frames_per_chunk
    assert group.videos.shape == (5, *unforked.shape[1:])
    for branch in group.videos:
        assert torch.equal(branch[:, : pivot * f], unforked[0, :, : pivot * f])
    assert torch.equal(group.prefix_latents, unforked[:, :, : pivot * f])
    # Exploration happens: branches differ from the pivot on.
    assert (group.videos[0, :, pivot * f :] - group.videos[1, :, pivot * f :]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigma_zero_branches_equal_the_unforked_rollout(tiny_model_in, text, dtype):
    tiny_model = tiny_model_in(dtype)
    plan_seed, pivot = 8, 1
    one_at_a_time = make_sampler(tiny_model, "sampler.fork_batch_size=1")
    plan = one_at_a_time.noise_plan(plan_seed)
    unforked = one_at_a_time.generate(text, plan)
    group = one_at_a_time.fork(text, plan, pivot=pivot, group_size=3, sigma=0.0, fork_seed=1)
    for branch in group.videos:
        assert torch.equal(branch, unforked[0])
    # Batched branches run the same arithmetic on bigger matrices: equal to float rounding.
    batched = make_sampler(tiny_model).fork(text, plan, pivot=pivot, group_size=3, sigma=0.0, fork_seed=1)
    # bf16: the same arithmetic rounded to 8 bits; equal here, one ulp of the flow allowed for a
    # rounding that another GEMM kernel would take the other way.
    assert (batched.videos - unforked).abs().max() < (1e-5 if dtype == torch.float32 else BF16_ULP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_noise_same_video(tiny_model_in, text, dtype):
    sampler = make_sampler(tiny_model_in(dtype))
    plan = sampler.noise_plan(3)
    a = sampler.fork(text, plan, pivot=1, group_size=4, sigma=0.5, fork_seed=6)
    b = sampler.fork(text, plan, pivot=1, group_size=4, sigma=0.5, fork_seed=6)
    assert torch.equal(a.videos, b.videos)
    assert torch.equal(a.pivot_predictions, b.pivot_predictions)
    # Two branches given the same noise inside one batch agree too, to float rounding: not bit for
    # bit, since the CPU GEMM may take a different kernel path for different rows of one batch (seen
    # once in CI on a loaded machine).
    twin = BranchNoise(plan, pivot=1, sigma=0.5, fork_seed=6, branches=(2, 2))
    cache = sampler.new_cache()
    list(sampler.stream(text, plan, cache=cache, end_chunk=1))
    outs = list(sampler.stream(text, twin, cache=cache, start_chunk=1))
    video = torch.cat([o.latents for o in outs], dim=2)
    tolerance = 1e-5 if dtype == torch.float32 else BF16_ULP  # see test_sigma_zero_branches_...
    assert (video[0] - video[1]).abs().max() < tolerance
    assert (video[0] - a.videos[2, :, 2:]).abs().max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_sub_batched_fork_equals_one_batch(tiny_model_in, text, dtype):
    tiny_model = tiny_model_in(dtype)
    plan = make_sampler(tiny_model).noise_plan(12)
    whole = make_sampler(tiny_model).fork(text, plan, pivot=2, group_size=6, sigma=0.5, fork_seed=2)
    parts = make_sampler(tiny_model, "sampler.fork_batch_size=4").fork(
        text, plan, pivot=2, group_size=6, sigma=0.5, fork_seed=2
    )
    assert torch.equal(whole.branch_noise, parts.branch_noise)
    tolerance = 1e-5 if dtype == torch.float32 else BF16_ULP  # see test_sigma_zero_branches_...
    assert (whole.videos - parts.videos).abs().max() < tolerance
    assert (whole.pivot_predictions - parts.pivot_predictions).abs().max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_fork_records_the_pivot_chunk(tiny_model_in, text, dtype):
    sampler = make_sampler(tiny_model_in(dtype))
    plan = sampler.noise_plan(30)
    g = sampler.fork(text, plan, pivot=2, group_size=4, sigma=0.5, fork_seed=9)
    T, f = sampler.scheduler.num_steps, sampler.frames_per_chunk
    assert g.pivot_inputs.shape == g.pivot_predictions.shape == (4, T, *sampler.chunk_shape)
    assert g.pivot_inputs.dtype == g.pivot_predictions.dtype == g.videos.dtype == torch.float32
    assert torch.equal(g.pivot_inputs[:, 0], g.branch_noise)
    assert torch.equal(g.base_noise, plan.initial(2))
    assert torch.equal(g.pivot_predictions[:, -1], g.videos[:, :, 2 * f : 3 * f])
    # Solver noise is shared: a branch's later inputs are its own predictions re-noised with it.
    sched = sampler.scheduler
    assert torch.equal(g.pivot_inputs[:, 1], sched.renoise(g.pivot_predictions[:, 0], plan.solver(2, 0), 1))


def test_fork_rejects_bad_arguments(tiny_model, text):
    sampler = make_sampler(tiny_model)
    with pytest.raises(ValueError, match="pivot"):
        sampler.fork(text, sampler.noise_plan(0), pivot=4, group_size=2, sigma=0.5, fork_seed=0)
    with pytest.raises(ValueError, match="one seed"):
        sampler.fork(text, sampler.noise_plan(0, 1), pivot=1, group_size=2, sigma=0.5, fork_seed=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 4])
def test_rebuilt_cache_matches_the_streamed_one(tiny_model, text, window, dtype):
    overrides = [] if window is None else [f"sampler.local_attn_frames={window}", "sampler.sink_frames=1"]
    model = copy.deepcopy(tiny_model).cast(dtype)
    sampler = make_sampler(model, "sampler.num_chunks=4", *overrides)
    plan = sampler.noise_plan(4)
    pivot = 3
    streamed = sampler.new_cache()
    prefix = torch.cat([o.latents for o in sampler.stream(text, plan, cache=streamed, end_chunk=pivot)], dim=2)
    rebuilt = sampler.rebuild_cache(text, prefix)
    # The one-pass rebuild under a block-causal mask (what the learner did before it replayed the
    # context passes chunk by chunk): the same cache to float tolerance.
    one_pass = sampler.new_cache()
    with torch.no_grad():
        t = torch.full((1,), sampler.scheduler.context_timestep)
        model(prefix.to(dtype), t, text.to(dtype), cache=one_pass, write_cache=True, frames_per_chunk=2)
    tolerance = 1e-4 if dtype == torch.float32 else BF16_ULP
    assert [c.start_frame for c in rebuilt.chunks] == [c.start_frame for c in streamed.chunks]
    assert [c.start_frame for c in one_pass.chunks] == [c.start_frame for c in streamed.chunks]
    for a, b, c in zip(streamed.chunks, rebuilt.chunks, one_pass.chunks, strict=True):
        for block in range(len(model.blocks)):
            # Replaying the rollout's own context passes at the rollout's batch gives its very bits.
            assert torch.equal(a.keys[block], b.keys[block]) and torch.equal(a.values[block], b.values[block])
            assert a.keys[block].dtype == dtype
            assert (a.keys[block].float() - c.keys[block].float()).abs().max() < tolerance
            assert (a.values[block].float() - c.values[block].float()).abs().max() < tolerance
    # What the learner needs: the behaviour policy's pivot predictions, recomputed on the rebuilt cache.
    group = sampler.fork(text, plan, pivot=pivot, group_size=3, sigma=0.5, fork_seed=1)
    with torch.no_grad():
        for step in range(sampler.scheduler.num_steps):
            x0 = sampler.predict_x0(group.pivot_inputs[:, step], step, pivot, text, rebuilt)
            assert (x0 - group.pivot_predictions[:, step]).abs().max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_context_noise_is_applied_and_rebuilt(tiny_model_in, text, dtype):
    tiny_model = tiny_model_in(dtype)
    sampler = make_sampler(tiny_model, "sampler.context_noise=100")
    plan = sampler.noise_plan(2)
    plain = make_sampler(tiny_model).generate(text, plan)
    noisy_ctx = sampler.generate(text, plan)
    assert (plain[:, :, 2:] - noisy_ctx[:, :, 2:]).abs().max() > 1e-4
    group = sampler.fork(text, plan, pivot=2, group_size=2, sigma=0.5, fork_seed=0)
    with pytest.raises(ValueError, match="noise"):
        sampler.rebuild_cache(text, group.prefix_latents)
    cache = sampler.rebuild_cache(text, group.prefix_latents, noise=plan)
    with torch.no_grad():
        x0 = sampler.predict_x0(group.pivot_inputs[:, 0], 0, 2, text, cache)
    # The rebuild replays the rollout's own context passes: its bits in bf16 too, here; the bf16
    # tolerance is the one of test_sigma_zero_branches_..., far below the context noise's effect.
    assert (x0 - group.pivot_predictions[:, 0]).abs().max() < (1e-4 if dtype == torch.float32 else BF16_ULP)


def test_bf16_predictions_are_the_fp32_ones_to_bf16_precision(tiny_model, tiny_model_bf16, text):
    # Both models rebuild the cache of one clean prefix and predict x0 from the same x_t at every
    # step: the gap is the bf16 rounding of weights and activations alone. Measured 0.008-0.012, about
    # one unit of the flow's last place; 4 allowed. A timestep rounded to bf16 on the way to the float32
    # time embedder (937.5 -> 936, 833.3 -> 832, 625 -> 624) makes it 0.05-0.075.
    fp32, bf16 = make_sampler(tiny_model), make_sampler(tiny_model_bf16)
    plan = fp32.noise_plan(4)
    pivot = 2
    outs = list(fp32.stream(text, plan, end_chunk=pivot + 1, record=(pivot,)))
    prefix = torch.cat([o.latents for o in outs[:pivot]], dim=2)
    cache32, cache16 = fp32.rebuild_cache(text, prefix), bf16.rebuild_cache(text, prefix)
    assert cache16.chunks[0].keys[0].dtype == torch.bfloat16 and cache16.text_kv[0][0].dtype == torch.bfloat16
    with torch.no_grad():
        for step in range(fp32.scheduler.num_steps):
            x_t = outs[pivot].inputs[:, step]
            expected = fp32.predict_x0(x_t, step, pivot, text, cache32)
            got = bf16.predict_x0(x_t, step, pivot, text, cache16)
            assert got.dtype == torch.float32
            assert (got - expected).abs().max() < 4 * BF16_ULP


# ---------------------------------------------------------------------------------------------
# The work the hardware does not need: K/V written in place, noise moved once per chunk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_cache_gives_the_concatenating_paths_bits(tiny_model_in, text, dtype):
    # The preallocated buffers hold the same keys/values in the same order as the concatenation did:
    # every rollout, fork (sub-batched, several pivots) and recorded prediction is bit for bit the same.
    model = tiny_model_in(dtype)
    in_place = make_sampler(model, "sampler.fork_batch_size=3")
    concatenating = make_sampler(model, "sampler.fork_batch_size=3")
    concatenating.preallocate_cache = False
    plan = in_place.noise_plan(7)
    assert torch.equal(in_place.generate(text, plan), concatenating.generate(text, plan))
    for pivot in (1, 3):
        a = in_place.fork(text, plan, pivot=pivot, group_size=5, sigma=0.5, fork_seed=2)
        b = concatenating.fork(text, plan, pivot=pivot, group_size=5, sigma=0.5, fork_seed=2)
        assert torch.equal(a.videos, b.videos) and torch.equal(a.pivot_predictions, b.pivot_predictions)
    # ...and the in-place path is the one that ran: chunk entries are views of the block buffers.
    cache = in_place.new_cache()
    list(in_place.stream(text, plan, cache=cache))
    keys, values = cache.buffers[0]
    assert cache.chunks[1].keys[0].untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
    assert cache.chunks[1].values[0].untyped_storage().data_ptr() == values.untyped_storage().data_ptr()
    assert concatenating.new_cache().capacity_frames is None


def test_fork_copies_its_prefix_once_per_block_not_at_every_step(tiny_model, text, monkeypatch):
    # Before: every forward of every branch concatenated the cached chunks of each block, the batch-1
    # prefix expanded to the branches' batch first, so the prefix was copied G times per block per step.
    from common.model.causal_wan import KVCache

    reads = []
    original = KVCache._pieces
    monkeypatch.setattr(KVCache, "_pieces", lambda self, *args: reads.append(args) or original(self, *args))
    blocks = len(tiny_model.blocks)
    for preallocate in (True, False):
        sampler = make_sampler(tiny_model, "sampler.fork_batch_size=2")
        sampler.preallocate_cache = preallocate
        reads.clear()
        sampler.fork(text, sampler.noise_plan(3), pivot=2, group_size=4, sigma=0.5, fork_seed=1)
        if preallocate:  # two sub-batches, each filling its buffers from the shared prefix once per block
            assert len(reads) == 2 * blocks and all(args[1:] == (0, 4) for args in reads), reads
        else:  # the concatenating path reads the cache at every forward of every chunk after the first
            assert len(reads) > 2 * blocks * sampler.scheduler.num_steps


def test_chunk_noise_is_the_plans_drawn_on_the_host_and_moved_in_one_copy(tiny_model, text, monkeypatch):
    import common.model.noise as noise_module
    from common.model.noise import NoisePlan, draw_chunk

    plan = NoisePlan((3,), (4, 2, 8, 8))
    branches = BranchNoise(plan, pivot=1, sigma=0.5, fork_seed=2, branches=(0, 3))
    for source in (plan, branches):
        drawn = draw_chunk(source, 1, 4, True, "cpu")
        assert torch.equal(drawn.initial, source.initial(1)) and torch.equal(drawn.context, source.context(1))
        assert len(drawn.solver) == 3 and all(torch.equal(drawn.solver[s], source.solver(1, s)) for s in range(3))
    assert draw_chunk(plan, 1, 4, False, None).context is None
    # The copy to another device keeps every tensor's shape and place in the pack (meta: a device
    # that exists on CPU-only machines too; the values are the host's by construction).
    moved = draw_chunk(branches, 1, 4, True, "meta")
    assert moved.initial.device.type == "meta" and moved.initial.shape == (2, 4, 2, 8, 8)
    assert [tuple(t.shape) for t in (*moved.solver, moved.context)] == [(1, 4, 2, 8, 8)] * 4

    # The sampler asks its noise source for host tensors and moves each chunk's noise once.
    asked, moves = [], []
    real_move = noise_module.to_device
    monkeypatch.setattr(noise_module, "to_device", lambda ts, device: moves.append(len(ts)) or real_move(ts, device))

    class Recording:
        batch_size = 1

        def initial(self, chunk, device=None, dtype=torch.float32):
            asked.append(device)
            return plan.initial(chunk, device, dtype)

        def solver(self, chunk, step, device=None, dtype=torch.float32):
            asked.append(device)
            return plan.solver(chunk, step, device, dtype)

        def context(self, chunk, device=None, dtype=torch.float32):
            asked.append(device)
            return plan.context(chunk, device, dtype)

    sampler = make_sampler(tiny_model)
    video = sampler.generate(text, Recording())
    steps = sampler.scheduler.num_steps
    assert moves == [steps] * sampler.num_chunks  # initial + T - 1 solver noises, one copy per chunk
    assert asked and all(device is None for device in asked)
    assert torch.equal(video, sampler.generate(text, plan))
