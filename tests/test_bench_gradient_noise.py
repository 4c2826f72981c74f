"""bench.gradient_noise: the batch-agreement arithmetic, and an end-to-end run at a tiny budget.
What the figures are on the committed generator is the bench's own output (README)."""

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
    for key in ("batch_cosine", "unit_batch_cosine"):
        assert list(result[key]) == ["1", "2"]
        assert all(-1 <= c <= 1 for c in result[key].values())
    assert set(result["mean_grad_norm_by_pivot"]) == set(result["pivots"])
    assert result["configured_batch"] == 16
    assert main(["--groups", "1"]) == 2


@pytest.mark.parametrize("bench", ["gradient_noise", "noise_sensitivity", "toy_alignment"])
def test_toy_benches_refuse_a_non_toy_config_naming_file_and_field(bench, capsys):
    import importlib

    module = importlib.import_module(f"bench.{bench}")
    assert module.main(["--config", "configs/self_forcing_wan1.3b.yaml"]) == 2
    err = capsys.readouterr().err
    assert "configs/self_forcing_wan1.3b.yaml" in err and "model.text_encoder_kind" in err and bench in err
