"""A learner update on real forked groups moves the policy toward high-reward neighbours."""

from __future__ import annotations

import torch

from common import adapters
from common.causal_wan import CausalWanTransformer3DModel
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

    before = _mean_distance_to(sampler, group, text, best)
    opt = torch.optim.Adam(params, lr=1e-3)
    settings = UpdateSettings(num_anchors=4, clip_eps=0.2, inner_steps=2, tau=1.0)
    gen = torch.Generator().manual_seed(0)
    first = arcopo_update(sampler, [group], [rewards], [text], params, opt, settings, gen)
    for _ in range(4):
        stats = arcopo_update(sampler, [group], [rewards], [text], params, opt, settings, gen)
    after = _mean_distance_to(sampler, group, text, best)
    assert after < before - 1e-3
    assert first.grad_norm > 0 and first.inner_steps == 2
    assert stats.ratio_max_dev > 0  # the policy moved away from the behaviour policy


def test_update_touches_only_the_trained_adapter():
    model, params, sampler = _setup()
    text = torch.randn(1, 8, 16)
    group = sampler.fork(text, sampler.noise_plan(5), pivot=2, group_size=4, sigma=0.5, fork_seed=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-3)
    arcopo_update(sampler, [group], [torch.tensor([1.0, 0.0, 0.5, 2.0])], [text], params, opt,
                  UpdateSettings(num_anchors=2))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
