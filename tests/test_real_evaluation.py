"""`cluster.evaluate` and `cluster.export` on the real architecture, with an out-of-domain score.

configs/self_forcing_wan1.3b.yaml shrunk to random weights of every real architecture, in the real
on-disk layouts, on CPU in bfloat16: Self-Forcing's causal Wan (2 blocks of 2 heads x 12, FFN 32,
text dim 16) read from Self-Forcing's checkpoint layout, a tiny Wan VAE (z_dim 4, strides 8 / 4), a
tiny UMT5 encoder and its tokenizer, a tiny VideoAlign (VideoReward layout on Qwen2-VL) for the
trained terms vq / mq / ta, and a tiny CLIP for the out-of-domain clip_score on held-out prompts.
Videos are 32x32 pixels, 2 chunks of 2 latent frames (13 pixel frames).

The run folder holds two different nonzero adapters; evaluation must score every policy on both
parts of the evaluation set, pick the scale by the dual-improvement rule and report it; the export at
s = 1 must be, as one adapter, the merged model. Without run.out_of_domain (merge still in
run.phases) the config is refused at load with one line naming the key.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cluster import evaluate as evaluate_cli
from cluster import export as export_cli
from common.config import ConfigError, load_config
from common.evaluation import EVAL_SEED_BASE
from common.model import adapters
from common.model.causal_wan import CausalWanTransformer3DModel
from common.model.loading import save_self_forcing_checkpoint
from common.model.policy import Policy
from learner.merge import Scores, pick_merge_scale
from rewards.registry import build_models
from rewards.server import score_batch
from rewards.tiny import make_tiny_clip, make_tiny_videoalign
from tests.conftest import BF16_ULP

# Every run folder here loads two adapters into one model, and peft warns at the second (by design).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

REAL = Path(__file__).resolve().parents[1] / "configs" / "self_forcing_wan1.3b.yaml"
# Words of the tiny UMT5 tokenizer (tests/conftest.make_umt5_dirs), so no prompt is all <unk>.
TRAIN = ["a red circle moving left", "a green square moving right", "a blue circle moving left on black background"]
HELDOUT = ["a blue square moving right", "a red square moving left on black background", "a green circle moving up"]
EVAL_PROMPTS, EVAL_SEEDS, OOD_PROMPTS = 2, 2, 1
# VideoAlign's built-in template is ~400 tokens with the tiny tokenizer; this one keeps a video a few ms.
TEMPLATE = (
    "Rate this AI-generated video. Textual prompt - {text_prompt}\n"
    "Visual Quality: <|VQ_reward|>\nMotion Quality: <|MQ_reward|>\nText Alignment: <|TA_reward|>\n"
)
POLICIES = ["reference (base)", "on_policy adapter alone", "semi adapter alone", "merged, s = 0", "merged, s = 1"]


def tiny_real_overrides(root: Path, vae: Path, umt5: Path) -> list[str]:
    """Overrides of the real config: every model file written under `root` (the transformer, the
    reward models, the prompt files), the VAE and UMT5 from the session's fixtures."""
    torch.manual_seed(0)
    transformer = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4)
    transformer |= dict(text_dim=16, ffn_dim=32, num_layers=2)
    kwargs = load_config(REAL, [f"model.transformer.{k}={v}" for k, v in transformer.items()])
    model = CausalWanTransformer3DModel(**kwargs.model.transformer.kwargs()).cast(torch.bfloat16)
    save_self_forcing_checkpoint(model, root / "self_forcing_dmd.pt")
    videoalign = make_tiny_videoalign(root / "videoalign")
    (videoalign / "prompt_template.txt").write_text(TEMPLATE)
    clip = make_tiny_clip(root / "clip")
    (root / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "heldout.txt").write_text("# held out\n" + "\n".join(HELDOUT) + "\n")
    models = [
        # 56x56 frames: 4 video tokens per frame pair (the tiny Qwen2-VL would otherwise upscale to ~316x316).
        dict(kind="videoalign", path=str(videoalign), device="cpu", min_pixels=56 * 56, max_pixels=56 * 56),
        dict(kind="clip", path=str(clip), device="cpu", num_frames=2),
    ]
    return [
        *(f"model.transformer.{k}={v}" for k, v in transformer.items()),
        f"model.self_forcing_checkpoint={root / 'self_forcing_dmd.pt'}",
        "model.latent_space=wan_vae",
        f"model.vae={vae}",
        "model.text_encoder_kind=umt5",
        f"model.text_encoder={umt5 / 'text_encoder'}",
        f"model.tokenizer={umt5 / 'tokenizer'}",
        "model.max_text_tokens=16",
        "model.dtype=bfloat16",
        "model.device=cpu",
        "sampler.height=32",
        "sampler.width=32",
        "sampler.num_chunks=2",
        "sampler.frames_per_chunk=2",
        "learner.lora.rank=4",
        "learner.lora.alpha=8",
        f"rollout.prompts={root / 'train.txt'}",
        f"rewards.models={json.dumps(models)}",
        "rewards.terms=[{name: vq}, {name: mq}, {name: ta}]",
        "rewards.num_gpus_per_server=0",
        "run.out_of_domain.terms=[{name: clip_score}]",
        f"run.out_of_domain.prompts={root / 'heldout.txt'}",
        f"run.out_of_domain.num_prompts={OOD_PROMPTS}",
        f"run.eval_prompts={EVAL_PROMPTS}",
        f"run.eval_seeds={EVAL_SEEDS}",
        "run.merge_scales=[0.0, 1.0]",
        "run.eval_batch_size=4",
    ]


def write_run(run: Path, config) -> Policy:
    """A finished run's folder: both adapters with nonzero, different B (A is Policy's seeded init),
    and config.yaml as cluster.train writes it. Returns the policy they were saved from."""
    policy = Policy.from_config(config)
    with torch.no_grad():
        for seed, name in enumerate(adapters.ADAPTERS, 1):
            gen = torch.Generator().manual_seed(seed)
            for key, p in policy.model.named_parameters():
                if "lora_B" in key and key.endswith(f".{name}.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            adapters.save_adapter(policy.model, name, run / "adapters" / name)
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return policy


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, vae_dir, umt5_dirs):
    """(config file, overrides, run folder, the evaluation's exit code): the evaluation runs once."""
    root = tmp_path_factory.mktemp("real_eval")
    overrides = tiny_real_overrides(root, vae_dir[0], umt5_dirs)
    config = load_config(REAL, overrides)
    config_file = root / "self_forcing_tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    run = root / "run"
    write_run(run, config)
    code = evaluate_cli.main(["--config", str(config_file), "--adapters", str(run), "--videos", "1"])
    return config_file, overrides, run, code


def test_evaluation_scores_both_parts_and_picks_by_the_dual_improvement_rule(real_run):
    config_file, _, run, code = real_run
    assert code == 0
    out = run / "eval"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["eval_videos"] == {"in_domain": EVAL_PROMPTS * EVAL_SEEDS, "out_of_domain": OOD_PROMPTS * EVAL_SEEDS}
    rows = {r["policy"]: r for r in scores["scores"]}
    assert list(rows) == POLICIES
    for name, row in rows.items():
        for part in ("in_domain", "out_of_domain"):
            mean, stderr = row[part]
            assert math.isfinite(mean) and math.isfinite(stderr) and stderr > 0, (name, part, row[part])
    # The adapters were loaded and move the policy: the two alone score apart, and s = 0 is semi alone.
    assert rows["on_policy adapter alone"]["in_domain"] != rows["semi adapter alone"]["in_domain"]
    assert rows["on_policy adapter alone"]["out_of_domain"] != rows["semi adapter alone"]["out_of_domain"]
    assert rows["merged, s = 0"] == {**rows["semi adapter alone"], "policy": "merged, s = 0"}
    parts = ("in_domain", "out_of_domain")
    assert scores["sweep"] == {f"{s:.1f}": {k: rows[f"merged, s = {s:g}"][k] for k in parts} for s in (0.0, 1.0)}

    # The reference's row recomputed here: VideoAlign's vq + mq + ta on the first training prompts,
    # CLIP's clip_score on the first held-out prompts, each with the evaluation seeds (batched as
    # run.eval_batch_size batches them: a video's bf16 pixels may depend on its batch).
    config = load_config(config_file)
    policy = Policy.from_config(config)
    policy.set_mode("reference")
    seeds = [EVAL_SEED_BASE + i for i in range(EVAL_SEEDS)]
    pairs = [(p, s) for p in TRAIN[:EVAL_PROMPTS] + HELDOUT[:OOD_PROMPTS] for s in seeds]
    models = build_models(config, remote=False)
    per_video: dict[str, list[float]] = {}
    for prompts, frames in policy.videos([p for p, _ in pairs], [s for _, s in pairs], config.run.eval_batch_size):
        for name, value in score_batch(models, frames, prompts).items():
            per_video.setdefault(name, []).extend(value.tolist())
    n = EVAL_PROMPTS * EVAL_SEEDS
    in_domain = [sum(per_video[k][i] for k in ("vq", "mq", "ta")) for i in range(n)]
    expected = {"in_domain": in_domain, "out_of_domain": per_video["clip_score"][n:]}
    for part, values in expected.items():
        mean, stderr = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
        assert rows["reference (base)"][part] == pytest.approx([mean, stderr], rel=1e-5, abs=1e-6), part

    pair = lambda r: Scores(r["in_domain"][0], r["out_of_domain"][0])  # noqa: E731
    chosen = pick_merge_scale(
        pair(rows["reference (base)"]), {0.0: pair(rows["merged, s = 0"]), 1.0: pair(rows["merged, s = 1"])}
    )
    assert scores["chosen_scale"] == chosen and scores["dual_improvement_passed"] == (chosen is not None)

    report = (out / "report.md").read_text()
    assert f"{EVAL_PROMPTS * EVAL_SEEDS} in-domain videos, {OOD_PROMPTS * EVAL_SEEDS} out-of-domain videos" in report
    assert "in-domain (1 vq + 1 mq + 1 ta)" in report and "out-of-domain (1 clip_score, held-out prompts)" in report
    assert all(f"| {p} | " in report for p in POLICIES) and " ± " in report
    html = (out / "report.html").read_text()
    assert "reference (base)" in html and "videos/reference_0.mp4" in html
    assert (out / "merge_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "videos" / "reference_0.mp4").stat().st_size > 0


@torch.no_grad()
def transformer_output(policy: Policy, config) -> torch.Tensor:
    c, h, w = config.latent_shape
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, c, config.sampler.frames_per_chunk, h, w, generator=gen)
    text = policy.text([TRAIN[0]])
    return policy.model(x.to(torch.bfloat16), torch.tensor([700.0]), text, return_dict=False)[0].float()


def test_export_at_scale_one_is_the_merged_model(real_run):
    _, _, run, code = real_run
    assert code == 0
    scores = json.loads((run / "eval" / "scores.json").read_text())
    (run / "summary.json").write_text(json.dumps({"merge_scale": scores["chosen_scale"], "scores": scores["scores"]}))
    assert export_cli.main(["--run", str(run), "--scale", "1.0"]) == 0
    out = run / "export"
    assert (out / adapters.LORA_FILE).stat().st_size > 0
    manifest = json.loads((out / "export.json").read_text())
    config = load_config(run / "config.yaml")
    rank = 2 * config.learner.lora.rank
    assert (manifest["merge_scale"], manifest["rank"], manifest["alpha"], manifest["dtype"]) == (
        1.0,
        rank,
        rank,
        "bfloat16",
    )
    card = (out / "model_card.md").read_text()
    assert "s = 1;" in card and str(config.model.self_forcing_checkpoint) in card
    base = next(r for r in scores["scores"] if r["policy"] == "reference (base)")
    mean, stderr = base["out_of_domain"]
    assert f"| reference (base) | {base['in_domain'][0]:.4f} ± " in card and f"| {mean:.4f} ± {stderr:.4f} |" in card

    exported = Policy.from_config(config)
    adapters.load_adapter(exported.model, out, "aligned")
    adapters.use_adapter(exported.model, "aligned")
    got = transformer_output(exported, config)

    merged = Policy.from_config(config)
    for name in adapters.ADAPTERS:
        adapters.load_adapter(merged.model, run / "adapters" / name, name)
    merged.set_mode("merged", 1.0)
    expected = transformer_output(merged, config)
    # bf16: the exported and merged layers round to the same bf16 outputs (tests/test_export.py's bound).
    assert (got - expected).abs().max().item() <= BF16_ULP
    # The scale is in the file: the merged model at s = 0 (and the base) are far off.
    merged.set_mode("merged", 0.0)
    assert (got - transformer_output(merged, config)).abs().max().item() > 20 * BF16_ULP
    merged.set_mode("reference")
    assert (got - transformer_output(merged, config)).abs().max().item() > 20 * BF16_ULP


def test_merge_without_an_out_of_domain_score_is_refused_at_load(real_run, tmp_path, capsys):
    config_file, overrides, run, _ = real_run
    assert "merge" in load_config(config_file).run.phases
    with pytest.raises(ConfigError) as refused:
        load_config(config_file, ["run.out_of_domain=null"])
    header, *problems = str(refused.value).splitlines()
    assert header == f"invalid configuration ({config_file} + overrides):"
    assert len(problems) == 1 and problems[0].strip().startswith("run.out_of_domain: unset"), problems
    assert "run.phases includes merge" in problems[0]
    # The real config itself, with the same overrides: refused the same way.
    with pytest.raises(ConfigError, match=r"\n  run.out_of_domain: unset, but run\.phases includes merge"):
        load_config(REAL, [*overrides, "run.out_of_domain=null"])

    capsys.readouterr()
    argv = ["--config", str(config_file), "--adapters", str(run), "run.out_of_domain=null"]
    assert evaluate_cli.main([*argv, "--videos", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and problems[0] in captured.err.splitlines()

    cli = subprocess.run(
        [sys.executable, "-m", "common.config", str(config_file), "run.out_of_domain=null"],
        capture_output=True,
        text=True,
        cwd=REAL.parents[1],
        timeout=120,
    )
    assert cli.returncode == 2 and cli.stdout == ""
    assert problems[0] in cli.stderr.splitlines(), cli.stderr
