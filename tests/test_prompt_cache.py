"""Prompt embeddings encoded once into a safetensors file, keyed by prompt and encoder: learners read
only the file, rollout workers build the text encoder only for a prompt it lacks."""

from __future__ import annotations

import shutil

import pytest
import torch

from common.model import loading
from common.model.loading import TextEncoder
from common.model.prompt_cache import (
    DEFAULT_NAME,
    FORMAT,
    CachedTextEncoder,
    PromptCacheError,
    build,
    with_cache_path,
)
from common.toy.world import ToyTextEncoder
from tests.conftest import make_umt5_dirs, tiny_config

PROMPTS = ["a red circle", "a blue square moving left", "  a red   circle ", "a green square on black background"]


def umt5_config(umt5, path, *overrides: str):
    return tiny_config(
        f"model.text_encoder={umt5 / 'text_encoder'}",
        f"model.tokenizer={umt5 / 'tokenizer'}",
        f"model.prompt_cache={path if path is not None else 'null'}",
        *overrides,
    )


@pytest.fixture()
def constructions(monkeypatch) -> list:
    """Every TextEncoder built from here on (what load_text_encoder builds for UMT5)."""
    built: list = []
    init = TextEncoder.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(loading.TextEncoder, "__init__", counted)
    return built


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_file_gives_what_the_encoder_gives_bit_for_bit(umt5_dirs, tmp_path, dtype):
    from safetensors import safe_open

    path = tmp_path / "embeddings.safetensors"
    cfg = umt5_config(umt5_dirs, path, f"model.dtype={dtype}")
    summary = build(cfg, PROMPTS, path)
    assert summary["encoded"] == 3 and summary["prompts"] == 3  # two prompts clean to one
    with safe_open(str(path), framework="pt") as f:  # safetensors, readable without this project
        meta = f.metadata()
        assert meta["format"] == FORMAT and len(list(f.keys())) == 3
        assert all(f.get_tensor(k).shape[0] < 8 for k in f.keys())  # own tokens only, not the padding
    fresh = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8, dtype=getattr(torch, dtype))
    expected = fresh.encode(PROMPTS)
    got = CachedTextEncoder(cfg, encoder_on_miss=False).encode(PROMPTS)
    assert got.dtype == expected.dtype == getattr(torch, dtype) and got.shape == (4, 8, 16)
    assert torch.equal(got, expected)
    assert CachedTextEncoder(cfg, encoder_on_miss=False).encode([]).shape == (0, 8, 16)


def test_a_file_is_keyed_by_encoder_content_not_path(umt5_dirs, tmp_path):
    path = tmp_path / "embeddings.safetensors"
    build(umt5_config(umt5_dirs, path), PROMPTS, path)
    # The same files elsewhere (another node's mount) are the same encoder.
    copy = tmp_path / "copy"
    shutil.copytree(umt5_dirs, copy)
    assert CachedTextEncoder(umt5_config(copy, path), encoder_on_miss=False).encode(PROMPTS[:1]).shape == (1, 8, 16)
    # Other weights, or another token count, are another encoder: refused by name, never rebuilt.
    other = make_umt5_dirs(tmp_path / "other", seed=1)
    before = path.read_bytes()
    for cfg, what in (
        (umt5_config(other, path), "fingerprint"),
        (umt5_config(umt5_dirs, path, "model.max_text_tokens=6"), "tokens: file 8, configured 6"),
    ):
        for make in (
            lambda cfg=cfg: CachedTextEncoder(cfg, encoder_on_miss=True),
            lambda cfg=cfg: build(cfg, PROMPTS, path),
        ):
            with pytest.raises(PromptCacheError, match=f"{path}: prompt embeddings of another text encoder.*{what}"):
                make()
    assert path.read_bytes() == before


def test_build_adds_only_the_missing_prompts(umt5_dirs, tmp_path, constructions):
    path = tmp_path / "embeddings.safetensors"
    cfg = umt5_config(umt5_dirs, path)
    build(cfg, PROMPTS[:2], path)
    first = CachedTextEncoder(cfg, encoder_on_miss=False).encode(PROMPTS[:2])
    assert build(cfg, PROMPTS, path)["encoded"] == 1  # only the green square is new
    assert build(cfg, PROMPTS, path)["encoded"] == 0 and len(constructions) == 2  # nothing left: no encoder
    assert torch.equal(CachedTextEncoder(cfg, encoder_on_miss=False).encode(PROMPTS[:2]), first)


def test_a_learner_never_builds_the_text_encoder(umt5_dirs, tmp_path, constructions):
    from learner.worker import Learner

    path = tmp_path / "embeddings.safetensors"
    cfg = umt5_config(umt5_dirs, path)
    build(cfg, PROMPTS, path)
    constructions.clear()
    learner = Learner(cfg.model_dump(mode="json"), 0, 1)
    text = learner.policy.text(PROMPTS)
    assert text.shape == (4, 8, 16) and not constructions and learner.policy.text_encoder.encoder is None
    with pytest.raises(RuntimeError, match="no decoder"):  # nor a VAE (tiny.yaml names none)
        learner.policy.decode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(PromptCacheError, match=f"prompt 'a blue circle' is not in the prompt-embedding file {path}"):
        learner.policy.text(["a red circle", "a blue circle"])
    assert not constructions
    with pytest.raises(PromptCacheError, match="model.prompt_cache is not set"):
        Learner(umt5_config(umt5_dirs, None).model_dump(mode="json"), 0, 1)
    with pytest.raises(PromptCacheError, match=f"no prompt-embedding file at {tmp_path / 'none'}"):
        Learner(umt5_config(umt5_dirs, tmp_path / "none").model_dump(mode="json"), 0, 1)
    assert not constructions


def test_a_rollout_worker_builds_the_encoder_only_on_a_miss(umt5_dirs, vae_dir, tmp_path, constructions):
    from actors.worker import RolloutWorker

    path = tmp_path / "embeddings.safetensors"
    cfg = umt5_config(umt5_dirs, path, f"model.vae={vae_dir[0]}")
    build(cfg, PROMPTS[:2], path)
    constructions.clear()
    worker = RolloutWorker(cfg.model_dump(mode="json"), "rollout-0")
    assert worker.policy.text(PROMPTS[:3]).shape == (3, 8, 16) and not constructions
    new = ["a green circle moving right", "a red circle"]
    got = worker.policy.text(new)
    assert len(constructions) == 1
    expected = TextEncoder(umt5_dirs / "text_encoder", umt5_dirs / "tokenizer", max_length=8).encode(new)
    assert torch.equal(got, expected)
    # The miss stays in the encoder's own memory: asked again, neither a new encoder nor a forward.
    calls: list = []
    worker.policy.text_encoder.encoder.model.register_forward_hook(lambda *_: calls.append(1))
    assert torch.equal(worker.policy.text(new), expected)
    assert len(constructions) == 2 and not calls  # the worker's one, and the reference built above


def test_the_toy_encoder_goes_through_the_file_unchanged(tmp_path):
    from common.config import load_config

    cfg = with_cache_path(load_config("configs/toy.yaml"), tmp_path)
    assert cfg.model.prompt_cache == (tmp_path / DEFAULT_NAME).resolve()
    prompts = ["a red circle moving left on a black background", "a green square moving up on a gray background"]
    build(cfg, prompts, cfg.model.prompt_cache)
    got = CachedTextEncoder(cfg, encoder_on_miss=False).encode(prompts)
    assert got.shape == (2, 4, 16) and torch.equal(got, ToyTextEncoder(dim=16).encode(prompts))


def test_a_damaged_file_is_refused_by_name(umt5_dirs, tmp_path):
    path = tmp_path / "embeddings.safetensors"
    cfg = umt5_config(umt5_dirs, path)
    torch.save({"a": torch.zeros(1)}, path)  # a pickle, not safetensors
    with pytest.raises(PromptCacheError, match=f"{path}: not a readable prompt-embedding file"):
        CachedTextEncoder(cfg, encoder_on_miss=True)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 16)}, str(path), metadata={"format": "pt"})
    with pytest.raises(PromptCacheError, match=f"{path}: not a prompt-embedding file"):
        CachedTextEncoder(cfg, encoder_on_miss=True)
