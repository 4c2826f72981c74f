"""A learner update on real forked groups moves the policy toward high-reward neighbours."""

from __future__ import annotations

import pytest
import torch

from common.model import adapters
from common.model.causal_wan import CausalWanTransformer3DModel
from learner.update import UpdateSettings, arcopo_update
from tests.conftest import make_sampler, tiny_config


def _setup():
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval()
    adapters.add_adapters(model, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    params = adapters.train_adapter(model, adapters.ON_POLICY)
    return model, params, make_sampler(model)


def _mean_distance_to(sampler, group, text, target):
    with torch.no_grad():
        cache = sampler.rebuild_cache(text, group.prefix_latents)
        pred = sampler.predict_x0(group.pivot_inputs[:, 0], 0, group.pivot, text, cache)
    return (pred - target).square().mean().item()


def test_update_moves_predictions_toward_the_best_branch():
    model, params, sampler = _setup()
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    group = sampler.fork(text, sampler.noise_plan(3), pivot=1, group_size=8, sigma=0.5, fork_seed=4)
    f = sampler.frames_per_chunk
    pivot_chunks = group.videos[:, :, f : 2 * f]
    rewards = -(pivot_chunks - pivot_chunks[0]).square().flatten(1).mean(1)  # branch 0 is best
    best = group.pivot_predictions[0, 0]

    before = [_mean_distance_to(sampler, group, text, group.pivot_predictions[i, 0]) for i in range(8)]
    opt = torch.optim.Adam(params, lr=1e-3)
    # The method's ratio clip (docs/method.md section 3: eps = 1e-4), on one fixed group as a semi-on-policy
    # update sees its buffer: once the ratios leave [1 - eps, 1 + eps], only the terms that moved the
    # wrong way keep a gradient.
    settings = UpdateSettings(num_anchors=4, clip_eps=1e-4, inner_steps=2, tau=1.0)
    gen = torch.Generator().manual_seed(0)
    first = arcopo_update(sampler, [group], [rewards], [text], params, opt, settings, gen)
    for _ in range(4):
        stats = arcopo_update(sampler, [group], [rewards], [text], params, opt, settings, gen)
    after = [_mean_distance_to(sampler, group, text, group.pivot_predictions[i, 0]) for i in range(8)]
    change = torch.tensor(after) - torch.tensor(before)
    # Toward the best branch (measured: -3.1e-3; flipping the advantages' sign makes it +3.8e-3), and
    # the more rewarded a branch, the more the predictions approach it (correlation measured: -0.92).
    assert _mean_distance_to(sampler, group, text, best) == after[0]
    assert change[0] < -1e-3 and change.argmin() == 0, change
    corr = torch.corrcoef(torch.stack([rewards, change]))[0, 1].item()
    print(f"distance changes {change.tolist()}, correlation with the rewards {corr:.3f}")
    assert corr < -0.5, (corr, change)
    assert first.grad_norm > 0 and first.inner_steps == 2
    # The policy left the behaviour policy by far more than rounding (an update that stepped nothing
    # leaves |rho - 1| at ~1e-7 or 0), and the method's clip binds (measured: 3.7e-3, 36% clipped).
    assert stats.ratio_max_dev > 10 * settings.clip_eps and stats.clip_fraction > 0.1, stats


def test_update_touches_only_the_trained_adapter():
    model, params, sampler = _setup()
    text = torch.randn(1, 8, 16)
    group = sampler.fork(text, sampler.noise_plan(5), pivot=2, group_size=4, sigma=0.5, fork_seed=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-3)
    arcopo_update(
        sampler, [group], [torch.tensor([1.0, 0.0, 0.5, 2.0])], [text], params, opt, UpdateSettings(num_anchors=2)
    )
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---------------------------------------------------------------------------------------------
# The real path's arithmetic: bf16 base, fp32 master adapters, bounded memory
# ---------------------------------------------------------------------------------------------


def _real_path_setup(dtype: torch.dtype, **update):
    """The tiny model in `dtype` with an on-policy adapter whose weights are ~0.025 in size (where
    a bf16 weight cannot take a 1e-5 step), one forked group, and AdamW at the method's lr."""
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_config().model.transformer.kwargs()).eval().cast(dtype)
    adapters.add_adapters(model, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    start = {
        k: 0.025 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(sorted(adapters.adapter_state_dict(model, adapters.ON_POLICY).items()))
    }
    adapters.load_adapter_state_dict(model, adapters.ON_POLICY, start)
    params = adapters.train_adapter(model, adapters.ON_POLICY)
    sampler = make_sampler(model)
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    group = sampler.fork(text, sampler.noise_plan(3), pivot=1, group_size=8, sigma=0.5, fork_seed=4)
    rewards = torch.linspace(-1.0, 1.0, 8)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    settings = UpdateSettings(**{"num_anchors": 4, "clip_eps": 1e-4, "inner_steps": 2, **update})
    return model, params, sampler, group, rewards, text, opt, settings


def _one_update(dtype: torch.dtype, **update):
    model, params, sampler, group, rewards, text, opt, settings = _real_path_setup(dtype, **update)
    before = [p.detach().clone() for p in params]
    stats = arcopo_update(
        sampler, [group], [rewards], [text], params, opt, settings, anchor_generators=[torch.Generator().manual_seed(0)]
    )
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    return step, params, opt, stats


def test_bf16_update_moves_the_adapters_like_the_fp32_update():
    fp32_step, _, _, _ = _one_update(torch.float32)
    bf16_step, params, opt, _ = _one_update(torch.bfloat16)
    # Master weights and optimiser state in fp32 beside a bf16 base.
    assert all(p.dtype == torch.float32 for p in params)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
    # Two AdamW steps of lr 1e-5: about 2e-5 per weight. With bf16 adapters most of it rounds away
    # (their spacing near 0.025 is 1.2e-4) and this relative difference is close to 1.
    assert fp32_step.abs().mean() > 1e-5
    relative = ((bf16_step - fp32_step).norm() / fp32_step.norm()).item()
    print(f"relative difference of the bf16 step: {relative:.3f}")
    assert relative < 0.25, relative


def test_bf16_update_starts_on_policy():
    # At the first inner step the learner's policy is the behaviour policy: every ratio is 1 to
    # rounding, through the whole path (rebuilt cache, B anchors, a bf16 forward at another batch size).
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-4)):
        _, _, _, stats = _one_update(dtype, inner_steps=1)
        assert stats.ratio_max_dev < tolerance, (dtype, stats.ratio_max_dev)
        assert stats.clip_fraction == 0.0


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wrong", ["prefix", "text", "adapter"])
def test_a_wrong_cache_moves_the_first_inner_step_off_policy(monkeypatch, dtype, tolerance, wrong):
    # The other side of test_bf16_update_starts_on_policy (same tolerances): through the whole path, a
    # rebuilt cache that is not the behaviour policy's h_{p-1} puts the first inner step off policy:
    # one from slightly other prefix latents (noise 0.05 on chunks in [-1, 1]), from another prompt's
    # text, or with the trained adapter off (the base weights).
    model, params, sampler, group, rewards, text, opt, settings = _real_path_setup(dtype, inner_steps=1)
    original = sampler.rebuild_cache

    def wrong_cache(text, prefix_latents, *args, **kwargs):
        if wrong == "prefix":
            noise = torch.randn(prefix_latents.shape, generator=torch.Generator().manual_seed(2))
            prefix_latents = prefix_latents + 0.05 * noise.to(prefix_latents.dtype)
        elif wrong == "text":
            text = torch.randn(text.shape, generator=torch.Generator().manual_seed(3)).to(text.dtype)
        else:
            with adapters.reference_policy(model):
                return original(text, prefix_latents, *args, **kwargs)
        return original(text, prefix_latents, *args, **kwargs)

    monkeypatch.setattr(sampler, "rebuild_cache", wrong_cache)
    stats = arcopo_update(
        sampler, [group], [rewards], [text], params, opt, settings, anchor_generators=[torch.Generator().manual_seed(0)]
    )
    # Measured max |rho - 1|: 0 on the right cache in both dtypes; here 1.1e-4 / 2.3e-4 / 1.1e-4 in fp32
    # and 3.8e-4 / 4.5e-4 / 4.1e-4 in bf16 (prefix / text / adapter). Small, because rho compares
    # softmaxes of mean squared distances at tau = 1, but over twice the on-policy tolerance each time.
    assert stats.ratio_max_dev > 2 * tolerance, stats


def test_gradient_checkpointing_and_anchor_micro_batches_do_not_change_the_update():
    plain, _, _, plain_stats = _one_update(torch.float32)
    model, params, sampler, group, rewards, text, opt, settings = _real_path_setup(torch.float32, anchor_micro_batch=1)
    model.enable_gradient_checkpointing()
    before = [p.detach().clone() for p in params]
    stats = arcopo_update(
        sampler, [group], [rewards], [text], params, opt, settings, anchor_generators=[torch.Generator().manual_seed(0)]
    )
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    assert plain.abs().max() > 0
    # Adam divides by |grad|, so weights with a near-zero gradient amplify the float reordering of
    # micro-batched sums; the step as a whole agrees to rounding.
    assert ((step - plain).norm() / plain.norm()).item() < 1e-3
    assert abs(stats.loss - plain_stats.loss) < 1e-6
    assert stats.clip_fraction == pytest.approx(plain_stats.clip_fraction)


def test_every_inner_step_sees_the_cache_of_the_weights_the_update_started_with(monkeypatch):
    # The cache is rebuilt per inner step to hold one group's cache at a time; it must be the
    # constant h_{p-1} of the start weights, not of the weights after the first optimiser step.
    model, params, sampler, group, rewards, text, opt, settings = _real_path_setup(torch.float32)
    opt.param_groups[0]["lr"] = 1e-2  # a step large enough to change the cache visibly
    rebuilt = []
    original = sampler.rebuild_cache

    def recording(*args, **kwargs):
        cache = original(*args, **kwargs)
        rebuilt.append([k.clone() for k in cache.chunks[0].keys])
        return cache

    monkeypatch.setattr(sampler, "rebuild_cache", recording)
    arcopo_update(
        sampler, [group], [rewards], [text], params, opt, settings, anchor_generators=[torch.Generator().manual_seed(0)]
    )
    assert len(rebuilt) == 2  # one group, rebuilt for each of the 2 inner steps
    for first, second in zip(*rebuilt, strict=True):
        assert torch.equal(first, second)
    after = original(text, group.prefix_latents)  # the weights now: a different cache
    assert any(not torch.equal(a, b) for a, b in zip(rebuilt[0], after.chunks[0].keys, strict=True))
