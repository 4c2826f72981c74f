"""The typed config: YAML + dotted overrides, errors that name the key path."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from common.config import Config, ConfigError, load_config, main, missing_paths, preflight
from common.model.causal_wan import CausalWanTransformer3DModel


def test_shipped_configs_load():
    tiny = load_config("configs/tiny.yaml")
    real = load_config("configs/self_forcing_wan1.3b.yaml")
    toy = load_config("configs/toy.yaml")
    assert tiny.run.phases == []  # a model only: it names no rewards or prompts
    assert toy.rewards.models == [] and toy.rollout.prompts is None  # the toy world's own
    assert [m["kind"] for m in real.rewards.models] == ["videoalign", "clip"]
    # The merge's out-of-domain score: terms and prompts the run never trains on.
    assert [t.name for t in real.run.out_of_domain.terms] == ["clip_score"] and real.run.out_of_domain.prompts
    assert [t.name for t in toy.run.out_of_domain.terms] == ["ood"] and toy.run.out_of_domain.prompts is None
    assert real.rollout.prompts is not None and real.model.self_forcing_checkpoint is not None
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
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "sampler.num_chunks=6",
            "sampler.denoising_steps=[1000, 500]",
            "sampler.local_attn_frames=null",
            "run.name=exp-1",
        ],
    )
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
    cfg = Config(run={"phases": []})  # the defaults are a real model that names no rewards
    assert cfg.algorithm.clip_eps == 1e-4 and cfg.algorithm.num_anchors == 4
    assert cfg.learner.lora.rank == 64 and cfg.learner.lora.alpha == 128


def test_cli_prints_resolved_config_and_rejects_bad(capsys):
    assert main(["configs/tiny.yaml", "sampler.num_chunks=5"]) == 0
    assert "num_chunks: 5" in capsys.readouterr().out
    assert main(["configs/tiny.yaml", "sampler.nope=1"]) == 2
    assert "sampler.nope: unknown key" in capsys.readouterr().err


# == no silent toy world ==============================================================================

REAL = "configs/self_forcing_wan1.3b.yaml"
TOY = "configs/toy.yaml"


@pytest.mark.parametrize(
    "config, overrides, keys",
    [
        (REAL, ["rewards.models=[]"], ["rewards.models: empty", "model.latent_space=wan_vae", "VideoAlign"]),
        (REAL, ["rewards.models=[{kind: toy}]"], ["rewards.models[0]: kind toy", "model.text_encoder_kind=umt5"]),
        (REAL, ["rewards.models=[{kind: clip, path: /x}, {kind: toy}]"], ["rewards.models[1]: kind toy"]),
        (REAL, ["rollout.prompts=null"], ["rollout.prompts: unset", "model.latent_space=wan_vae"]),
        ("configs/tiny.yaml", ["run.phases=[on_policy]"], ["rewards.models: empty", "rollout.prompts: unset"]),
        (REAL, ["model.text_encoder_kind=toy"], ["model.latent_space=wan_vae with model.text_encoder_kind=toy"]),
        (TOY, ["model.text_encoder_kind=umt5"], ["model.latent_space=pixels with model.text_encoder_kind=umt5"]),
    ],
)
def test_a_real_model_never_falls_back_to_the_toy_world(config, overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    for key in keys:
        assert key in str(err.value)
    # With no phase the config describes a model only (tests, bench.streaming): it loads, but a job
    # entry point still refuses it.
    model_only = load_config(config, [*overrides, "run.phases=[]"])
    with pytest.raises(ConfigError) as err:
        preflight(model_only)
    assert keys[0] in str(err.value)


def test_the_defaults_are_refused_for_a_job():
    with pytest.raises(ValidationError, match="rewards.models: empty"):
        Config()
    with pytest.raises(ConfigError, match="rewards.models: empty"):
        load_config(None)


def test_scoring_and_prompts_of_a_model_only_config_are_not_the_toy_world():
    from cluster.prompts import PromptError, load_prompts
    from common.config import reward_model_specs
    from common.errors import RewardError

    tiny = load_config("configs/tiny.yaml")
    with pytest.raises(RewardError, match="rewards.models: empty"):
        reward_model_specs(tiny)
    with pytest.raises(PromptError, match="rollout.prompts"):
        load_prompts(load_config("configs/tiny.yaml", ["model.text_encoder_kind=toy"]))
    toy = load_config(TOY)
    assert [s.kind for s in reward_model_specs(toy)] == ["toy"] and load_prompts(toy)[1]


def test_preflight_names_every_missing_path(tmp_path):
    overrides = [
        f"model.vae={tmp_path / 'vae'}",
        f"rollout.prompts={tmp_path / 'p.txt'}",
        f"run.out_of_domain.prompts={tmp_path / 'heldout.txt'}",
        f"rewards.models=[{{kind: videoalign, path: {tmp_path / 'vr'}, base_model: {tmp_path / 'qwen'}, "
        f"prompt_template: {tmp_path / 't.txt'}, num_gpus: 1}}, "
        f"{{kind: pickscore, path: {tmp_path / 'ps'}, processor: {tmp_path / 'proc'}}}]",
    ]
    lines = missing_paths(load_config(REAL, overrides))
    assert {line.split(":")[0] for line in lines} == {
        "model.self_forcing_checkpoint",
        "model.vae",
        "model.text_encoder",
        "model.tokenizer",
        "rollout.prompts",
        "run.out_of_domain.prompts",
        "rewards.models[0].path",
        "rewards.models[0].base_model",
        "rewards.models[0].prompt_template",
        "rewards.models[1].path",
        "rewards.models[1].processor",
    }
    text = "\n".join(lines)
    assert f"rewards.models[0].path: {tmp_path / 'vr'} does not exist (a local VideoAlign/VideoReward" in text
    assert f"model.vae: {tmp_path / 'vae'} does not exist (a local Wan VAE directory)" in text
    # Once they exist, nothing is missing.
    for name in ("vae", "vr", "qwen", "ps", "proc", "umt5"):
        (tmp_path / name).mkdir()
    for name in ("p.txt", "heldout.txt", "t.txt", "sf.pt"):
        (tmp_path / name).write_text("x")
    present = [
        f"model.self_forcing_checkpoint={tmp_path / 'sf.pt'}",
        f"model.text_encoder={tmp_path / 'umt5'}",
        f"model.tokenizer={tmp_path / 'umt5'}",
    ]
    cfg = load_config(REAL, [*overrides, *present])
    assert missing_paths(cfg) == []
    assert preflight(cfg) is None
    assert preflight(load_config(TOY)) is None  # assets/toy_generator is committed


def test_preflight_refuses_a_real_model_without_weights_vae_or_text_encoder():
    cfg = load_config(REAL, ["model.self_forcing_checkpoint=null", "model.vae=null", "model.text_encoder=null"])
    lines = "\n".join(missing_paths(cfg))
    assert "model.self_forcing_checkpoint: not set (nor model.diffusers_transformer)" in lines
    assert "model.vae: not set" in lines and "model.text_encoder: not set" in lines
    with pytest.raises(ConfigError, match="rollout.prompts"):
        preflight(cfg)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, ignore=("rollout.prompts",))
    assert "rollout.prompts" not in str(err.value)


def test_train_cli_refuses_missing_files_before_ray_starts():
    import subprocess
    import sys
    import time

    # Ray not even imported: the refusal comes before anything starts.
    code = (
        f"import sys; from cluster.train import main; rc = main(['--config', {REAL!r}]); "
        "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "no ray"
    assert "Traceback" not in proc.stderr
    assert "rewards.models[0].path: checkpoints/VideoReward does not exist" in proc.stderr
    assert "model.self_forcing_checkpoint: checkpoints/self_forcing_dmd.pt does not exist" in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(" does not exist (" in line for line in lines), lines  # one line per path, nothing else
    assert took < 30, f"took {took:.1f} s"  # imports only, on a loaded 2-core machine


def test_train_refuses_a_model_only_config_and_keeps_the_run_folder(tmp_path, capsys):
    from cluster.train import main as train_main

    (tmp_path / "arcopo").mkdir()
    (tmp_path / "arcopo" / "keep.txt").write_text("x")
    assert train_main(["--config", "configs/tiny.yaml", "--overwrite", f"run.output_dir={tmp_path}"]) == 2
    assert "run.phases: empty" in capsys.readouterr().err
    assert train_main(["--config", REAL, "--overwrite", f"run.output_dir={tmp_path}"]) == 2
    assert "rollout.prompts: prompts/train.txt does not exist" in capsys.readouterr().err
    assert (tmp_path / "arcopo" / "keep.txt").is_file()  # --overwrite deletes nothing before the checks


def test_evaluate_cli_refuses_missing_files(tmp_path, capsys):
    from cluster.evaluate import main as evaluate_main

    assert evaluate_main(["--config", REAL, "--adapters", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rewards.models[0].base_model: checkpoints/Qwen2-VL-2B-Instruct does not exist" in err
    assert "rollout.prompts" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert evaluate_main(["--config", REAL, "--adapters", str(tmp_path), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "rollout.prompts" not in err and "model.vae" in err  # --prompts stands in for rollout.prompts


def test_a_merge_without_an_out_of_domain_score_is_refused_at_load():
    # The dual-improvement rule needs both scores; without one the job used to end on a NaN.
    with pytest.raises(ConfigError, match=r"run.out_of_domain: unset, but run.phases includes merge"):
        load_config(TOY, ["run.out_of_domain=null"])
    assert load_config(TOY, ["run.out_of_domain=null", "run.phases=[reference, semi, on_policy]"])
    with pytest.raises(ConfigError, match=r"run.out_of_domain.terms: \['vq'\] also in rewards.terms"):
        load_config(TOY, ["run.out_of_domain.terms=[{name: ood}, {name: vq}]"])
    with pytest.raises(ConfigError, match="run.out_of_domain.terms"):
        load_config(TOY, ["run.out_of_domain.terms=[]"])
    # A real model names its held-out prompts: the toy world's would be 16x16 stand-ins.
    with pytest.raises(ConfigError, match="run.out_of_domain.prompts: unset"):
        load_config(REAL, ["run.out_of_domain.prompts=null"])


def test_held_out_prompts_must_never_be_training_prompts(tmp_path):
    from cluster.prompts import PromptError, load_prompts

    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    train.write_text("a cat\na dog\n")
    heldout.write_text("a bird\na dog\n")
    cfg = load_config(TOY, [f"rollout.prompts={train}", f"run.out_of_domain.prompts={heldout}"])
    with pytest.raises(PromptError, match=r"shares 1 prompt\(s\) with .*train.txt, e.g. 'a dog'"):
        load_prompts(cfg)
    heldout.write_text("a bird\n")
    assert load_prompts(cfg) == (["a cat", "a dog"], ["a bird"])
    # The toy world's split is disjoint by construction, and a held-out file is checked against it.
    toy_train, toy_heldout = load_prompts(load_config(TOY))
    assert toy_heldout and not set(toy_train) & set(toy_heldout)
    heldout.write_text(toy_train[3] + "\n")
    with pytest.raises(PromptError, match="the toy world's training prompts"):
        load_prompts(load_config(TOY, [f"run.out_of_domain.prompts={heldout}"]))


# -- overrides of string fields stay the string typed (docs/redis.md, "Passwords") -------------------


@pytest.mark.parametrize(
    ("typed", "value"),
    [
        ("123456", "123456"),  # YAML: an int, refused by a str field
        ("true", "true"),  # YAML: a bool
        ("@bc", "@bc"),  # YAML: a syntax error (@ is reserved)
        ("a b", "a b"),
        ("x=y==", "x=y=="),  # only the first = separates key and value
        ("'quoted'", "'quoted'"),  # no YAML unquoting either
        ("~", "~"),  # YAML: null; only the bare word null unsets
        ("null", None),  # an optional string field: null alone means unset (the documented rule)
    ],
)
def test_string_override_is_the_literal_text(typed, value):
    cfg = load_config(TOY, [f"replay.redis_password={typed}"])
    assert cfg.replay.redis_password == value
    assert value is None or type(cfg.replay.redis_password) is str


def test_string_override_rule_leaves_other_fields_yaml():
    cfg = load_config(
        TOY,
        [
            "run.name=123",  # a plain str field: even null is the string
            "cluster.address=null",  # optional str: unset
            "model.vae=null",  # optional Path: unset
            "run.output_dir=2026",  # a Path: the digits
            "sampler.denoising_steps=[1000, 500]",  # a list
            "rollout.resources={rollout_gpu: 1}",  # a dict
            "learner.resources.learner_gpu=2",  # a key inside a dict field
            "cluster.num_cpus=4",
            "learner.lr=1e-4",
            "replay.redis_tls=true",
            "run.out_of_domain.prompts=007",  # a Path under an optional section
            "replay.redis_url=redis://h:6380/0?a=1&b=2",
        ],
    )
    assert cfg.run.name == "123" and cfg.cluster.address is None and cfg.model.vae is None
    assert str(cfg.run.output_dir) == "2026" and str(cfg.run.out_of_domain.prompts) == "007"
    assert cfg.sampler.denoising_steps == [1000, 500] and cfg.rollout.resources == {"rollout_gpu": 1.0}
    assert cfg.learner.resources == {"learner_gpu": 2.0} and cfg.cluster.num_cpus == 4 and cfg.learner.lr == 1e-4
    assert cfg.replay.redis_tls is True and cfg.replay.redis_url == "redis://h:6380/0?a=1&b=2"
    assert load_config(TOY, ["run.name=null"]).run.name == "null"
    with pytest.raises(ConfigError, match="cluster.num_cpus"):
        load_config(TOY, ["cluster.num_cpus=four"])  # non-string fields are still typed
