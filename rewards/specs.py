"""What one entry of `rewards.models` may say: which reward model, where its files are, what it needs.

Validated when the config loads (pydantic only; nothing heavy is imported here), so a typo in a
reward entry fails before Ray starts. Every path is local: nothing is downloaded.

    rewards:
      models:
        - {kind: videoalign, path: /ckpt/VideoReward, base_model: /ckpt/Qwen2-VL-2B-Instruct,
           device: cuda, dtype: bfloat16, num_gpus: 1}
        - {kind: pickscore, path: /ckpt/PickScore_v1, processor: /ckpt/CLIP-ViT-H-14, prefix: ""}
        - {kind: clip, path: /ckpt/clip-vit-large-patch14, runtime_env: {pip: [...]}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

KINDS = ("toy", "videoalign", "clip", "pickscore")


class RewardModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["toy", "videoalign", "clip", "pickscore"]
    path: Path | None = Field(None, description="checkpoint directory (required for every kind but toy)")
    prefix: str = Field("", description="prepended to every component name (two CLIP models side by side)")
    components: list[str] | None = Field(None, description="toy only: which toy rewards (default vq, mq, ta, ood)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # VideoAlign (VideoReward)
    base_model: Path | None = Field(None, description="local Qwen2-VL-2B-Instruct directory (config, tokenizer, "
                                    "preprocessor, chat template); default: <path>/base or model_config.json's")
    checkpoint_step: int | None = Field(None, description="checkpoint-<step> to load; default the latest")
    fps: float = Field(2.0, gt=0, description="frames sampled per second of video (VideoAlign: 2)")
    max_pixels: int = Field(448 * 448, ge=28 * 28, description="per sampled frame (VideoAlign: 200704)")
    min_pixels: int = Field(128 * 28 * 28, ge=28 * 28)
    normalize: bool = Field(True, description="VideoAlign: published mean/std normalisation of VQ, MQ, TA")
    prompt_template: Path | None = Field(None, description="text file with {text_prompt} and the three reward "
                                         "tokens; default <path>/prompt_template.txt, else the built-in one")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longer prompts are truncated with a warning; "
                                          "default: 512 for VideoAlign, the text tower's limit for CLIP")
    # CLIP / PickScore
    processor: Path | None = Field(None, description="CLIP processor directory if not in `path` (PickScore)")
    num_frames: int = Field(8, ge=1, description="CLIP/PickScore: frames sampled uniformly, scores averaged")
    # Placement
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0, description="only for a model in its own actor (runtime_env set)")
    runtime_env: dict[str, Any] | None = Field(None, description="run this model in its own Ray actor with "
                                              "this runtime_env (clashing dependencies)")

    def check(self) -> "RewardModelSpec":
        if self.kind != "toy" and self.path is None:
            raise ValueError(f"a {self.kind} reward model needs `path` (a local checkpoint directory)")
        if self.kind != "toy" and self.components is not None:
            raise ValueError("`components` is for the toy kind; real models declare their own")
        return self


def check_model_entries(entries: list[dict], num_gpus_per_server: float) -> list[dict]:
    """Validate every entry; returns them normalised (JSON-safe, defaults filled in)."""
    out = []
    for i, entry in enumerate(entries):
        try:
            spec = RewardModelSpec.model_validate(entry).check()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ValueError(f"rewards.models[{i}].{where}: {first['msg']}") from None
        except ValueError as exc:
            raise ValueError(f"rewards.models[{i}]: {exc}") from None
        out.append(spec.model_dump(mode="json", exclude_defaults=True) | {"kind": spec.kind})
    in_server = sum(RewardModelSpec.model_validate(e).num_gpus for e in out
                    if not RewardModelSpec.model_validate(e).runtime_env)
    if in_server > num_gpus_per_server + 1e-9:
        raise ValueError(f"rewards.models declare {in_server:g} GPU(s) inside a server but "
                         f"rewards.num_gpus_per_server is {num_gpus_per_server:g}")
    return out


def specs(config) -> list[RewardModelSpec]:
    """The RewardModelSpec of every configured model; none configured means the toy rewards, which
    only a toy-world model may fall back to."""
    from common.config import is_toy_world
    from common.errors import RewardError

    if not config.rewards.models and not is_toy_world(config.model):
        # Config refuses this when it loads unless run.phases is empty (a model-only config such as
        # configs/tiny.yaml); scoring with such a config must not quietly become the toy world.
        raise RewardError(f"rewards.models: empty, which means the toy world's rewards, but model.latent_space="
                          f"{config.model.latent_space} / model.text_encoder_kind={config.model.text_encoder_kind} "
                          "is not the toy world; name the reward models")
    entries = config.rewards.models or [{"kind": "toy"}]
    return [RewardModelSpec.model_validate(e).check() for e in entries]
