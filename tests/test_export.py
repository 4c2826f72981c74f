"""Export of the aligned policy: the folded LoRA and the fused transformer against the merged model,
the scale, the model card, the command line's choices and refusals (learner/export.py, cluster/export.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import WanTransformer3DModel

from cluster import export as export_cli
from common.config import load_config
from common.model import adapters
from common.model.loading import load_diffusers_transformer, load_policy
from learner.export import ExportError, export_policy, fold_adapters
from tests.conftest import BF16_ULP, cast_copy

# Every run folder here loads two adapters into one model, and peft warns at the second (by design).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

SCALE = 0.4
# fp32 on the toy world's committed generator; the bf16 twin on the tiny real-architecture model.
# Tolerances: fp32 sums the two adapters' outputs in another order than the folded matmul (measured
# 2e-6); in bf16 both round to the same bf16 output (measured 0), and the fused weights are rounded
# to bf16 once more (measured one unit, 2^-7, at |y| < 2).
CASES = [
    pytest.param("configs/toy.yaml", "float32", 1e-5, 1e-5, id="fp32-toy"),
    pytest.param("configs/tiny.yaml", "bfloat16", BF16_ULP, 2 * BF16_ULP, id="bf16-tiny"),
]


def make_run(root, config, seed: int = 3, summary: dict | None = None):
    """A finished run's folder as cluster.train leaves it: both adapters trained (B nonzero and
    different), config.yaml, and summary.json when given."""
    model = load_policy(config)
    lora = config.learner.lora
    torch.manual_seed(seed)
    adapters.add_adapters(model, lora.rank, lora.alpha, lora.target_modules)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    for name in adapters.ADAPTERS:
        adapters.save_adapter(model, name, root / "adapters" / name)
    (root / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def merged_model(config, run, scale: float):
    model = load_policy(config)
    for name in adapters.ADAPTERS:
        adapters.load_adapter(model, run / "adapters" / name, name)
    adapters.merge_adapters(model, scale)
    return model


def inputs(config):
    c, h, w = config.latent_shape
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, c, config.sampler.frames_per_chunk, h, w, generator=gen)
    text = torch.randn(1, config.model.max_text_tokens, config.model.transformer.text_dim, generator=gen)
    return x, torch.tensor([700.0]), text


@torch.no_grad()
def output(model, config) -> torch.Tensor:
    x, t, text = inputs(config)
    dtype = model.patch_embedding.weight.dtype
    out = model(x.to(dtype), t, text.to(dtype), return_dict=False)[0]
    return getattr(out, "sample", out).float()  # diffusers' own Wan returns an output object


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("config_path, dtype, lora_tol, fused_tol", CASES)
def test_exported_adapter_alone_is_the_merged_model_at_its_scale(tmp_path, config_path, dtype, lora_tol, fused_tol):
    config = load_config(config_path, [f"model.dtype={dtype}"])
    run = make_run(tmp_path / "run", config)
    out = export_policy(config, run, SCALE, tmp_path / "export")

    exported = load_policy(config)
    adapters.load_adapter(exported, out, "aligned")
    adapters.use_adapter(exported, "aligned")
    got = output(exported, config)
    assert _max_diff(got, output(merged_model(config, run, SCALE), config)) <= lora_tol
    # The scale is in the file: the merged model at another scale is far off.
    assert _max_diff(got, output(merged_model(config, run, 1.0), config)) > 20 * lora_tol

    manifest = json.loads((out / "export.json").read_text())
    rank = 2 * config.learner.lora.rank
    assert (manifest["merge_scale"], manifest["rank"], manifest["alpha"]) == (SCALE, rank, rank)
    assert adapters.adapter_state_dict(exported, "aligned")["blocks.0.attn1.to_q.lora_A.weight"].shape[0] == rank


@pytest.mark.parametrize("config_path, dtype, lora_tol, fused_tol", CASES)
def test_exported_adapter_loads_into_diffusers_wan(tmp_path, config_path, dtype, lora_tol, fused_tol):
    config = load_config(config_path, [f"model.dtype={dtype}"])
    run = make_run(tmp_path / "run", config)
    out = export_policy(config, run, SCALE, tmp_path / "export")

    base = load_policy(config)
    plain = cast_copy(WanTransformer3DModel(**config.model.transformer.kwargs()).eval(), getattr(torch, dtype))
    plain.load_state_dict(base.state_dict())  # the same keys: the causal model is diffusers' Wan
    plain.load_lora_adapter(str(out), weight_name=adapters.LORA_FILE, prefix="transformer", adapter_name="aligned")
    expected = output(merged_model(config, run, SCALE), config)
    # diffusers makes the LoRA layers bf16 like their base (ours stay float32): one more rounding.
    assert _max_diff(output(plain, config), expected) <= 2 * lora_tol


@pytest.mark.parametrize("config_path, dtype, lora_tol, fused_tol", CASES)
def test_fused_transformer_is_the_merged_model(tmp_path, config_path, dtype, lora_tol, fused_tol):
    config = load_config(config_path, [f"model.dtype={dtype}"])
    run = make_run(tmp_path / "run", config)
    out = export_policy(config, run, SCALE, tmp_path / "export", fuse=True)

    from safetensors import safe_open

    with safe_open(next((out / "transformer").glob("*.safetensors")), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    fused_config = load_config(
        config_path, [f"model.dtype={dtype}", f"model.diffusers_transformer={out / 'transformer'}"]
    )
    fused = load_policy(fused_config)  # as a config names a base model
    got = output(fused, config)
    assert _max_diff(got, output(merged_model(config, run, SCALE), config)) <= fused_tol
    assert _max_diff(got, output(merged_model(config, run, 1.0), config)) > 5 * fused_tol
    assert (
        _max_diff(output(load_diffusers_transformer(out / "transformer", dtype=getattr(torch, dtype)), config), got)
        == 0
    )


def test_fold_ignores_the_scale_a_merge_left_on_the_model(tmp_path):
    # peft keeps merge_adapters' scale inside the on-policy layers' scaling; folding that would apply
    # the scale twice (0.7 x 0.4) whenever a model is exported after a sweep.
    config = load_config("configs/toy.yaml")
    run = make_run(tmp_path / "run", config)
    model = merged_model(config, run, 0.7)
    folded, metadata = fold_adapters(model, SCALE)
    assert folded.keys() == adapters.adapter_state_dict(model, adapters.SEMI).keys()
    layer = model.blocks[0].attn1.to_q
    c = config.learner.lora.alpha / config.learner.lora.rank

    def delta(name):
        return layer.lora_B[name].weight @ layer.lora_A[name].weight

    expected = c * delta(adapters.SEMI) + SCALE * c * delta(adapters.ON_POLICY)
    got = folded["blocks.0.attn1.to_q.lora_B.weight"] @ folded["blocks.0.attn1.to_q.lora_A.weight"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert (metadata["r"], metadata["lora_alpha"]) == (2 * config.learner.lora.rank, 2 * config.learner.lora.rank)


def test_cli_takes_the_runs_scale_and_writes_a_model_card(tmp_path, capsys):
    config = load_config("configs/toy.yaml")
    scores = [
        {"policy": "reference", "in_domain": [0.9912, 0.0021], "out_of_domain": [0.8123, 0.0034]},
        {"policy": "merged, s = 0.4", "in_domain": [1.0034, 0.0019], "out_of_domain": None},
    ]
    run = make_run(tmp_path / "run", config, summary={"merge_scale": SCALE, "scores": scores})
    assert export_cli.main(["--run", str(run)]) == 0
    out = run / "export"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["merge_scale"] == SCALE
    card = (out / "model_card.md").read_text()
    assert "assets/toy_generator" in card and "docs/method.md" in card and "AR-CoPO" in card
    assert "s = 0.4" in card and "rank 16" in card
    assert "| reference | 0.9912 ± 0.0021 | 0.8123 ± 0.0034 |" in card
    assert "| merged, s = 0.4 | 1.0034 ± 0.0019 | n/a |" in card
    assert "```yaml\nmodel:" in card
    assert load_config(out / "config.yaml") == config

    # --scale wins over the summary, and a second export replaces the first.
    assert export_cli.main(["--run", str(run), "--scale", "1"]) == 0
    assert json.loads((out / "export.json").read_text())["merge_scale"] == 1.0
    assert "s = 1;" in (out / "model_card.md").read_text()


def test_cli_refusals_name_the_file(tmp_path, capsys):
    config = load_config("configs/toy.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli.main(["--run", str(empty), "--scale", "0.4"]) == 2
    assert f"{empty}/adapters/semi/{adapters.LORA_FILE}" in capsys.readouterr().err

    run = make_run(tmp_path / "run", config)  # no summary.json
    assert export_cli.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "--scale" in err
    (run / "summary.json").write_text(json.dumps({"reward_final": 1.0}))
    assert export_cli.main(["--run", str(run)]) == 2
    assert 'summary.json has no "merge_scale"' in capsys.readouterr().err

    # The export folder is replaced whole, so a folder that is not an earlier export is never taken.
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert export_cli.main(["--run", str(run), "--scale", "0.4", "--out", str(foreign)]) == 2
    assert str(foreign) in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="scores\\[0\\]"):
        export_policy(config, run, SCALE, tmp_path / "x", scores=[{"in_domain": [1, 0]}])
    with pytest.raises(ExportError, match="merge scale"):
        export_policy(config, run, float("nan"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
