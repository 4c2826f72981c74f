"""The streaming generator as a user runs it: chunk-by-chunk VAE decoding, the incremental mp4 writer,
and `cluster.generate` end to end against the merged policy's own videos (common/model/streaming_decode.py,
common/video.py, cluster/generate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cluster import export as export_cli
from cluster import generate as generate_cli
from common.config import load_config
from common.model import adapters
from common.model.loading import decode_latents, load_vae
from common.model.policy import Policy
from common.model.streaming_decode import PixelChunkDecoder, WanVaeChunkDecoder, chunk_decoder
from common.video import Mp4Writer, encode_mp4, read_mp4
from tests.conftest import DTYPES, tiny_config

# Every run folder here loads two adapters into one model, and peft warns at the second (by design).
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

SCALE = 0.4
SEED = 7
TOY_PROMPTS = ["a blue cross moving right on a brown background", "a green square moving down on a brown background"]


def make_run(root, config) -> Policy:
    """A finished run's folder (both adapters trained: B nonzero and different, config.yaml,
    summary.json with the chosen scale); returns the policy the adapters were saved from."""
    policy = Policy.from_config(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name in adapters.ADAPTERS:
        adapters.save_adapter(policy.model, name, root / "adapters" / name)
    (root / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (root / "summary.json").write_text(json.dumps({"merge_scale": SCALE}))
    return policy


def reference_mp4(policy: Policy, prompt: str, scale: float, tmp_path, upscale: int) -> torch.Tensor:
    """The merged policy's whole-video frames for (prompt, SEED), through the same H.264 encoder."""
    policy.set_mode("merged", scale)
    frames = next(policy.videos([prompt], [SEED], 1))[1][0]
    path = tmp_path / f"reference_{scale}.mp4"
    path.write_bytes(encode_mp4(frames, fps=generate_cli.DEFAULT_FPS, upscale=upscale))
    return read_mp4(path)[0]


def off_by_more_than_2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of values more than 2 grey levels apart. Equal frames encode to equal bytes; a pixel that
    rounds the other way in float (the fused weights) can move an H.264 block by up to 13 levels
    (measured: 0.25% of values), where a wrong scale, seed or cache moves 40-60% of them."""
    assert a.shape == b.shape
    return ((a.int() - b.int()).abs() > 2).float().mean().item()


# -- the streaming decoder ---------------------------------------------------------------------


@pytest.mark.parametrize("slicing", [False, True], ids=["batched", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vae_chunks_decode_to_the_whole_videos_frames(vae_dir, dtype, slicing):
    vae = load_vae(vae_dir[0], dtype=dtype)
    if slicing:
        vae.enable_slicing()
    latents = torch.randn(2, 4, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = decode_latents(vae, latents)
    decoder = WanVaeChunkDecoder(vae)
    for _ in range(2):  # a second video after reset() starts afresh
        chunks = [decoder(latents[:, :, i : i + 2]) for i in range(0, 8, 2)]
        assert [c.shape[1] for c in chunks] == [5, 8, 8, 8]  # 1 + 4 (f - 1) frames, then 4 f
        assert torch.equal(torch.cat(chunks, dim=1), whole)
        decoder.reset()
    # What the cache is for: the same latents decoded without the earlier chunks differ.
    assert not torch.equal(decoder(latents[:, :, 2:4])[:, 1:], whole[:, 6:13])


def test_chunk_decoder_from_the_config(vae_dir):
    toy = load_config("configs/toy.yaml")
    assert isinstance(chunk_decoder(toy), PixelChunkDecoder)
    chunk = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert torch.equal(chunk_decoder(toy)(chunk), Policy.from_config(toy).decode(chunk))
    assert isinstance(chunk_decoder(tiny_config(f"model.vae={vae_dir[0]}")), WanVaeChunkDecoder)
    with pytest.raises(ValueError, match="model.vae is not set"):
        chunk_decoder(tiny_config())


# -- the mp4 writer ----------------------------------------------------------------------------


def test_mp4_written_in_pieces_is_encode_mp4s_file(tmp_path):
    frames = torch.randint(0, 256, (9, 15, 17, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = encode_mp4(frames, fps=16.0, upscale=2)
    with Mp4Writer(tmp_path / "v.mp4", fps=16.0, upscale=2) as video:
        for piece in (frames[:1], frames[1:5], frames[5:]):
            video.write(piece)
            assert not (tmp_path / "v.mp4").exists()  # the file appears whole, at the end
    assert (tmp_path / "v.mp4").read_bytes() == whole
    assert read_mp4(tmp_path / "v.mp4")[0].shape == (9, 30, 34, 3)  # padded to even sizes


def test_mp4_writer_leaves_no_file_when_interrupted(tmp_path):
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="crash"), Mp4Writer(tmp_path / "v.mp4") as video:
        video.write(frames)
        raise RuntimeError("crash")
    with pytest.raises(ValueError, match="after frames of 16x16"), Mp4Writer(tmp_path / "v.mp4") as video:
        video.write(frames)
        video.write(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no frames"), Mp4Writer(tmp_path / "v.mp4"):
        pass
    assert list(tmp_path.iterdir()) == []


# -- cluster.generate ---------------------------------------------------------------------------


def test_generate_streams_the_exported_policys_videos(tmp_path, capsys):
    config = load_config("configs/toy.yaml")
    policy = make_run(tmp_path / "run", config)
    assert export_cli.main(["--run", str(tmp_path / "run"), "--fuse"]) == 0
    export = tmp_path / "run" / "export"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# toy prompts\n" + "\n".join(TOY_PROMPTS) + "\n")
    capsys.readouterr()

    for adapter, out in ((export, export / "videos"), (export / "transformer", tmp_path / "fused")):
        argv = ["--config", str(export / "config.yaml"), "--adapter", str(adapter), "--prompts", str(prompts)]
        assert generate_cli.main(argv + (["--out", str(out)] if adapter != export else [])) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        result = json.loads(lines[-1])
        assert len(lines) == len(TOY_PROMPTS) + 1
        assert result["videos"] == [str(out / f"video_{i}.mp4") for i in range(len(TOY_PROMPTS))]
        assert sorted(p.name for p in out.iterdir()) == ["prompts.txt", "video_0.mp4", "video_1.mp4"]
        assert 0 < result["first_chunk_latency_s"] and result["frames_per_second"] > 0
        assert result["frames"] == len(TOY_PROMPTS) * config.sampler.num_frames

        for prompt, path in zip(TOY_PROMPTS, result["videos"], strict=True):
            frames, fps = read_mp4(path)
            assert frames.shape == (config.sampler.num_frames, 128, 128, 3) and fps == generate_cli.DEFAULT_FPS
            assert off_by_more_than_2(frames, reference_mp4(policy, prompt, SCALE, tmp_path, 8)) <= 0.01
            assert off_by_more_than_2(frames, reference_mp4(policy, prompt, 1.0, tmp_path, 8)) > 0.1


def test_generate_bf16_with_the_real_vae_and_text_encoder(tmp_path, vae_dir, umt5_dirs):
    config = tiny_config(
        "model.dtype=bfloat16",
        f"model.vae={vae_dir[0]}",
        f"model.text_encoder={umt5_dirs / 'text_encoder'}",
        f"model.tokenizer={umt5_dirs / 'tokenizer'}",
    )
    from learner.export import export_policy

    policy = make_run(tmp_path / "run", config)
    export = export_policy(config, tmp_path / "run", SCALE, tmp_path / "export")
    prompt = "a red circle moving left"
    result = generate_cli.generate(config, export, [prompt], tmp_path / "videos", seed=SEED, log=lambda line: None)
    frames, _ = read_mp4(result["videos"][0])
    assert frames.shape == (1 + 4 * (config.sampler.num_frames - 1), 128, 128, 3)  # 64x64, upscaled 2x
    assert off_by_more_than_2(frames, reference_mp4(policy, prompt, SCALE, tmp_path, 2)) <= 0.01
    assert off_by_more_than_2(frames, reference_mp4(policy, prompt, 1.0, tmp_path, 2)) > 0.1


class FailsAtSecondChunk(PixelChunkDecoder):
    calls = 0

    def __call__(self, latents):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of memory")
        return super().__call__(latents)


def test_a_crash_mid_video_leaves_no_file(tmp_path):
    config = load_config("configs/toy.yaml")
    make_run(tmp_path / "run", config)
    assert export_cli.main(["--run", str(tmp_path / "run")]) == 0
    gen = generate_cli.load_generator(config, tmp_path / "run" / "export")
    gen.decoder = FailsAtSecondChunk()
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_cli.stream_video(gen, TOY_PROMPTS[0], SEED, tmp_path / "out" / "v.mp4", 16.0, 8)
    assert gen.decoder.calls == 2 and not list((tmp_path / "out").glob("*"))


def test_generate_refusals_name_the_folder_or_file(tmp_path, capsys):
    config = load_config("configs/toy.yaml")
    with pytest.raises(generate_cli.GenerateError, match=f"{tmp_path}: neither"):
        generate_cli.load_generator(config, tmp_path)
    make_run(tmp_path / "run", config)
    assert export_cli.main(["--run", str(tmp_path / "run"), "--fuse"]) == 0
    export = tmp_path / "run" / "export"
    both = export / "transformer"
    (both / adapters.LORA_FILE).write_bytes((export / adapters.LORA_FILE).read_bytes())
    with pytest.raises(generate_cli.GenerateError, match="pass one"):
        generate_cli.load_generator(config, both)

    argv = ["--config", str(export / "config.yaml"), "--adapter", str(export), "--prompts"]
    capsys.readouterr()
    assert generate_cli.main([*argv, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("a red circle moving left\n")
    assert generate_cli.main([*argv, str(tmp_path / "bad.txt")]) == 2
    assert f"{tmp_path / 'bad.txt'}: not a toy prompt" in capsys.readouterr().err
    assert not (export / "videos").exists()
