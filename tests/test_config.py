"""The typed config: YAML + dotted overrides, errors that name the key path."""

from __future__ import annotations

import pytest
import torch

from common.causal_wan import CausalWanTransformer3DModel
from common.config import Config, ConfigError, load_config, main


def test_shipped_configs_load():
    tiny = load_config("configs/tiny.yaml")
    real = load_config("configs/self_forcing_wan1.3b.yaml")
    assert tiny.sampler.num_frames == 8
    assert real.sampler.num_frames == 21
    assert real.latent_shape == (16, 60, 104)
    assert real.algorithm.group_size == 12 and real.algorithm.fork_sigma == 0.5


def test_real_config_is_the_1_3b_wan():
    cfg = load_config("configs/self_forcing_wan1.3b.yaml")
    with torch.device("meta"):
        model = CausalWanTransformer3DModel(**cfg.model.transformer.kwargs())
    params = sum(p.numel() for p in model.parameters())
    assert 1.2e9 < params < 1.5e9
    assert model.tokens_per_frame(60, 104) == 1560


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["sampler.num_chunks=6", "sampler.denoising_steps=[1000, 500]",
                                            "sampler.local_attn_frames=null", "run.name=exp-1"])
    assert cfg.sampler.num_chunks == 6
    assert cfg.sampler.denoising_steps == [1000, 500]
    assert cfg.run.name == "exp-1"


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.num_chunk=4", "sampler.num_chunk: unknown key"),
        ("sampler.num_chunks=zero", "sampler.num_chunks"),
        ("sampler.num_chunks=0", "sampler.num_chunks"),
        ("algorithm.fork_sigma=2", "algorithm.fork_sigma"),
        ("model.transformer.num_layers=-1", "model.transformer.num_layers"),
        ("algorithm.num_anchors=13", "algorithm.num_anchors"),
        ("sampler.denoising_steps=[250, 500]", "sampler.denoising_steps"),
        ("sampler.local_attn_frames=1", "sampler.local_attn_frames"),
        ("algorithm.trained_steps=[7]", "algorithm.trained_steps"),
        ("sampler.height=60", "sampler.height"),
        ("bogus.section=1", "bogus: unknown key"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert key in str(err.value)


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["sampler.num_chunks"])
    with pytest.raises(ConfigError, match="sampler.num_chunks is a value"):
        load_config(None, ["sampler.num_chunks=3", "sampler.num_chunks.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_defaults_are_the_paper():
    cfg = Config()
    assert cfg.algorithm.clip_eps == 1e-4 and cfg.algorithm.num_anchors == 4
    assert cfg.learner.lora.rank == 64 and cfg.learner.lora.alpha == 128


def test_cli_prints_resolved_config_and_rejects_bad(capsys):
    assert main(["configs/tiny.yaml", "sampler.num_chunks=5"]) == 0
    assert "num_chunks: 5" in capsys.readouterr().out
    assert main(["configs/tiny.yaml", "sampler.nope=1"]) == 2
    assert "sampler.nope: unknown key" in capsys.readouterr().err
