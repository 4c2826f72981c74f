"""bench.gradient_noise: the batch-agreement arithmetic, and an end-to-end run at a tiny budget.
What the figures are on the committed generator is the bench's own output (docs/results.md)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.gradient_noise import batch_cosines, main, signal_to_noise


def test_batch_cosines_follow_the_signal_plus_noise_model():
    gen = torch.Generator().manual_seed(0)
    dim, groups = 20_000, 64
    identical = torch.ones(groups, dim)
    assert batch_cosines(identical, [1, 8], splits=5, seed=0) == {1: pytest.approx(1.0), 8: pytest.approx(1.0)}
    noise = torch.randn(groups, dim, generator=gen)
    pure = batch_cosines(noise, [1, 16], splits=20, seed=0)
    assert abs(pure[1]) < 0.05 and abs(pure[16]) < 0.05  # independent batches do not agree
    # signal g with |g|^2 = r E|noise|^2, r = 0.1: cosine n r / (1 + n r), 1/11 at n = 1, 1.6/2.6 at 16.
    signal = torch.randn(dim, generator=gen) * 0.1**0.5
    mixed = batch_cosines(signal + noise, [1, 16], splits=20, seed=0)
    assert mixed[1] == pytest.approx(0.1 / 1.1, abs=0.03)
    assert mixed[16] == pytest.approx(1.6 / 2.6, abs=0.03)
    assert signal_to_noise(16, 1.6 / 2.6) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="need 8 groups"):
        batch_cosines(noise[:6], [4], splits=1, seed=0)


def test_gradient_noise_runs_on_the_toy_generator(capsys):
    assert main(["--json", "--groups", "4", "--splits", "3", "algorithm.group_size=4", "algorithm.num_anchors=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["groups"] == 4 and sum(result["pivots"].values()) == 4
    raw, unit = result["batch_cosine"], result["unit_batch_cosine"]
    assert list(raw) == list(unit) == ["1", "2"]
    # For batches of one group, scaling each group's gradient to unit norm changes no cosine: the two
    # columns agree there exactly when both use the same splits and scale each row by its own norm.
    assert unit["1"] == pytest.approx(raw["1"], abs=1e-5)
    # r and 1 / r are read off the largest batch's cosine, as the docstring's model says.
    assert result["signal_to_noise_per_group"] == pytest.approx(signal_to_noise(2, raw["2"]))
    assert result["unit_signal_to_noise_per_group"] == pytest.approx(signal_to_noise(2, unit["2"]))
    r = result["signal_to_noise_per_group"]
    assert result["batch_for_cosine_half"] == (pytest.approx(1 / r) if r > 0 else None)
    assert set(result["mean_grad_norm_by_pivot"]) == set(result["pivots"])
    assert all(0 < v < 1 for v in result["mean_grad_norm_by_pivot"].values())  # docs/results.md: 1.6e-4 to 4.4e-3
    assert result["configured_batch"] == 16
    assert main(["--groups", "1"]) == 2


def test_group_gradients_are_each_groups_own_first_step_gradient():
    """Row i is group i's gradient alone (not accumulated over the groups before it), at the first
    inner step, and taking them moves no weight."""
    import random

    from bench import load_toy_config
    from bench.gradient_noise import group_gradients
    from cluster.inprocess import InProcessRun
    from common.model import adapters
    from learner.update import UpdateSettings, arcopo_update

    cfg = load_toy_config("gradient_noise", "configs/toy.yaml", ["algorithm.group_size=4", "algorithm.num_anchors=2"])
    torch.manual_seed(0)
    toy = InProcessRun(cfg)
    before = {k: v.clone() for k, v in adapters.adapter_state_dict(toy.model, adapters.ON_POLICY).items()}
    grads, pivots = group_gradients(toy, 3, seed=5)
    after = adapters.adapter_state_dict(toy.model, adapters.ON_POLICY)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads.shape[0] == 3 and len(pivots) == 3 and grads.norm(dim=1).min() > 0

    # The same three groups, each differentiated on its own from zeroed gradients.
    params = adapters.train_adapter(toy.model, adapters.ON_POLICY)
    adapters.use_adapter(toy.model, adapters.ON_POLICY)
    settings = UpdateSettings.from_config(cfg)
    settings.inner_steps, settings.grad_clip = 1, float("inf")
    rng = random.Random(5)
    for i in range(3):
        with torch.no_grad():
            group = toy.collect(rng.choice(toy.train_prompts), rng, 0, adapters.ON_POLICY)
        for p in params:
            p.grad = None
        stats = arcopo_update(
            toy.sampler,
            [group],
            [group.rewards],
            [toy.policy.text([group.prompt])],
            params,
            torch.optim.SGD(params, lr=0.0),
            settings,
            torch.Generator().manual_seed(5 + i),
        )
        assert stats.ratio_max_dev < 1e-5  # the first inner step is on policy
        alone = torch.cat([p.grad.flatten() for p in params])
        assert group.pivot == pivots[i]
        torch.testing.assert_close(grads[i], alone, rtol=1e-5, atol=1e-9)
    toy.model.requires_grad_(False)


@pytest.mark.parametrize("bench", ["gradient_noise", "noise_sensitivity", "toy_alignment"])
def test_toy_benches_refuse_a_non_toy_config_naming_file_and_field(bench, capsys):
    import importlib

    module = importlib.import_module(f"bench.{bench}")
    assert module.main(["--config", "configs/self_forcing_wan1.3b.yaml"]) == 2
    err = capsys.readouterr().err
    assert "configs/self_forcing_wan1.3b.yaml" in err and "model.text_encoder_kind" in err and bench in err
