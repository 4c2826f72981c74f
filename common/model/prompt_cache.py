"""Prompt embeddings computed once per prompt set, in a file every role reads.

UMT5-XXL takes 10.6 GiB in bf16; loaded by every rollout worker and every learner it would take that
much of each GPU to re-encode the same few thousand prompts. Instead the job encodes its prompts once,
on the rollout role's resources (cluster/placement.encode_prompts), into `model.prompt_cache`
(default `<run folder>/prompt_embeddings.safetensors`). Learners read only that file and never build
the encoder; rollout workers read it and build the encoder only when a prompt is not in it.

The file is safetensors (no pickle). Per prompt it holds that prompt's own tokens' embeddings
[length, dim], in the encoder's dtype, exactly what `TextEncoder` keeps in its in-memory cache; reading
pads them with zeros to the encoder's token count, which is exactly what `TextEncoder.encode` returns.
A tensor's name is a digest of the prompt's key text (the cleaned prompt for UMT5, the prompt as
written for the toy encoder, each as its encoder reads it). The metadata records:
    format   FORMAT
    encoder  JSON of `encoder_identity`: kind, token count, dim, dtype and a content fingerprint of
             the encoder and tokenizer files (paths are not part of it: the same weights may sit
             at different paths on different nodes)
    source   JSON of the paths it was made from, for error messages only
    prompts  JSON {tensor name: key text}

A file made by another encoder (other weights, tokenizer, dtype or token count) is refused with a
PromptCacheError naming the file and what differs, never rebuilt in place: the path may be shared by
other runs, and resuming a run with another encoder is a mistake to surface, not to paper over.
Delete the file or point `model.prompt_cache` elsewhere.

The toy world's encoder (`model.text_encoder_kind: toy`) costs nothing, but its roles read the same
file (the job's driver writes it, without a task) so that the toy job exercises what a real job's
roles do; its embeddings are stored bit for bit, so the toy job's results do not change.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.config import Config

FORMAT = "arcopo-prompt-embeddings/1"
DEFAULT_NAME = "prompt_embeddings.safetensors"
# Weight files are fingerprinted by sampling (hashing 11-22 GB would take minutes on every role's
# start): their size, first MiB (the safetensors header, with every name, shape and offset) and this
# many evenly spaced blocks. A re-trained or re-saved checkpoint differs there; a corrupted byte
# elsewhere would not be seen, which is not what this guards against.
_SAMPLED_BLOCKS, _BLOCK_BYTES, _HEAD_BYTES, _WHOLE_FILE_BYTES = 64, 64 << 10, 1 << 20, 32 << 20
_FINGERPRINTED = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt"}


class PromptCacheError(ValueError):
    """A prompt-embedding file that cannot be used; the message names the file (and the prompt)."""


# ---------------------------------------------------------------------------------------------
# Which encoder
# ---------------------------------------------------------------------------------------------


def _file_digest(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            h.update(f.read())
            return
        h.update(f.read(_HEAD_BYTES))
        for i in range(_SAMPLED_BLOCKS):
            f.seek(_HEAD_BYTES + (size - _HEAD_BYTES - _BLOCK_BYTES) * i // (_SAMPLED_BLOCKS - 1))
            h.update(f.read(_BLOCK_BYTES))


def _directory_fingerprint(path: Path, key: str) -> str:
    """A digest of a model directory's weights, configs and tokenizer files (hidden files, such as a
    hub cache's, and documentation are not part of what the model computes)."""
    path = Path(path)
    if not path.is_dir():
        raise PromptCacheError(f"{key}: directory not found: {path}")
    h = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if file.suffix not in _FINGERPRINTED or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0".encode())
        _file_digest(h, file)
    return h.hexdigest()


def _toy_fingerprint(encoder) -> str:
    # The toy encoder has no files: its table of word vectors is its weights.
    h = hashlib.blake2b(digest_size=16)
    for (slot, word), vector in sorted(encoder._table.items()):
        h.update(f"{slot}/{word}\0".encode())
        h.update(vector.contiguous().numpy().tobytes())
    return h.hexdigest()


def layout(config: Config) -> dict:
    """kind, tokens, dim and dtype of the configured encoder's output: `encode` gives
    [B, tokens, dim] of dtype (UMT5 pads to model.max_text_tokens; the toy encoder has four tokens)."""
    m = config.model
    if m.text_encoder_kind == "toy":
        from common.toy.world import ToyTextEncoder

        return {"kind": "toy", "tokens": ToyTextEncoder.num_tokens, "dim": m.transformer.text_dim, "dtype": "float32"}
    return {"kind": "umt5", "tokens": m.max_text_tokens, "dim": m.transformer.text_dim, "dtype": m.dtype}


def encoder_identity(config: Config) -> tuple[dict, dict]:
    """(identity, source) of the configured text encoder, without loading it. Two files hold
    interchangeable embeddings exactly when their identities are equal; `source` names the paths."""
    m = config.model
    if m.text_encoder_kind == "toy":
        from common.toy.world import ToyTextEncoder

        return {**layout(config), "fingerprint": _toy_fingerprint(ToyTextEncoder(dim=m.transformer.text_dim))}, {}
    if m.text_encoder is None:
        raise PromptCacheError("model.text_encoder is not set (a local UMT5 encoder directory)")
    tokenizer = m.tokenizer if m.tokenizer is not None else m.text_encoder
    h = hashlib.blake2b(digest_size=16)
    h.update(_directory_fingerprint(m.text_encoder, "model.text_encoder").encode())
    h.update(_directory_fingerprint(tokenizer, "model.tokenizer").encode())
    source = {"text_encoder": str(Path(m.text_encoder).resolve()), "tokenizer": str(Path(tokenizer).resolve())}
    return {**layout(config), "fingerprint": h.hexdigest()}, source


def key_function(config: Config) -> Callable[[str], str]:
    """What an encoder reads of a prompt: UMT5 cleans it (two prompts that clean alike are one entry);
    the toy encoder parses it as written."""
    if config.model.text_encoder_kind == "toy":
        return str
    from common.model.loading import TextEncoder

    return TextEncoder._clean


def tensor_name(key: str) -> str:
    return "p" + hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


def cache_path(config: Config, run_root: Path) -> Path:
    """The file `config` names: model.prompt_cache, or the run folder's default; absolute, so every
    role finds the same file whatever its working directory."""
    m = config.model
    return Path(m.prompt_cache if m.prompt_cache is not None else Path(run_root) / DEFAULT_NAME).resolve()


def with_cache_path(config: Config, run_root: Path):
    """`config` with model.prompt_cache resolved (what the job hands every role)."""
    model = config.model.model_copy(update={"prompt_cache": cache_path(config, run_root)})
    return config.model_copy(update={"model": model})


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


class PromptFile:
    """An open prompt-embedding file whose encoder matches; tensors are read on demand (mapped)."""

    def __init__(self, path: Path, identity: dict):
        from safetensors import safe_open

        self.path, self.identity = Path(path), identity
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            meta = self._handle.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type, OSError or ValueError
            raise PromptCacheError(
                f"{self.path}: not a readable prompt-embedding file (truncated or not "
                f"safetensors?): {str(exc).strip()[:300]}"
            ) from None
        if meta.get("format") != FORMAT:
            raise PromptCacheError(
                f"{self.path}: not a prompt-embedding file (metadata format "
                f"{meta.get('format')!r}, expected {FORMAT!r})"
            )
        try:
            found = json.loads(meta["encoder"])
            self.source = json.loads(meta.get("source", "{}"))
            self.prompts: dict[str, str] = json.loads(meta["prompts"])
        except (KeyError, ValueError) as exc:
            raise PromptCacheError(f"{self.path}: damaged metadata ({exc})") from None
        if found != identity:
            differ = [
                f"{k}: file {found.get(k)!r}, configured {identity.get(k)!r}"
                for k in sorted(set(found) | set(identity))
                if found.get(k) != identity.get(k)
            ]
            made_from = f" (made from {self.source})" if self.source else ""
            raise PromptCacheError(
                f"{self.path}: prompt embeddings of another text encoder{made_from}: {'; '.join(differ)}. "
                "Delete the file, or point model.prompt_cache at another file, to encode the prompts again"
            )
        names = set(self._handle.keys())
        lost = sorted(set(self.prompts) - names)
        if lost:
            raise PromptCacheError(
                f"{self.path}: metadata lists {len(lost)} prompt(s) without a tensor, e.g. {self.prompts[lost[0]]!r}"
            )
        self.by_key = {key: name for name, key in self.prompts.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def get(self, key: str) -> torch.Tensor:
        """The prompt's own tokens' embeddings [length, dim]."""
        emb = self._handle.get_tensor(self.by_key[key])
        tokens, dim = self.identity["tokens"], self.identity["dim"]
        if emb.ndim != 2 or emb.shape[1] != dim or not 0 < emb.shape[0] <= tokens:
            raise PromptCacheError(
                f"{self.path}: embeddings of {key!r} have shape {tuple(emb.shape)}, expected [1..{tokens}, {dim}]"
            )
        return emb


def open_file(path: Path, identity: dict) -> PromptFile | None:
    """The file at `path` if there is one (refused if another encoder made it), else None."""
    return PromptFile(path, identity) if Path(path).is_file() else None


def write_file(path: Path, embeddings: dict[str, torch.Tensor], identity: dict, source: dict) -> Path:
    """{key text: [length, dim]} -> the file, replaced atomically (readers see the old or the new one)."""
    from safetensors.torch import save

    from common.durable import write_bytes_atomic

    # clone: an encoder's rows can be views of one batch tensor, which safetensors refuses to save.
    tensors = {tensor_name(k): v.detach().to("cpu").contiguous().clone() for k, v in embeddings.items()}
    metadata = {
        "format": FORMAT,
        "encoder": json.dumps(identity, sort_keys=True),
        "source": json.dumps(source, sort_keys=True),
        "prompts": json.dumps({tensor_name(k): k for k in embeddings}, ensure_ascii=False),
    }
    return write_bytes_atomic(path, save(tensors, metadata=metadata))


def build(config: Config, prompts: list[str], path: Path) -> dict:
    """Make the file at `path` hold every prompt of `prompts`: what it already holds (from the same
    encoder) is kept, the rest encoded with the configured encoder, built only if something is
    missing. Returns {path, prompts, encoded, seconds}."""
    from common.model.loading import load_text_encoder

    start = time.perf_counter()
    path = Path(path)
    identity, source = encoder_identity(config)
    key = key_function(config)
    existing = open_file(path, identity)
    held = {} if existing is None else {k: existing.get(k) for k in existing.by_key}
    todo: dict[str, str] = {}  # key text -> the first prompt with it (the encoder takes prompts)
    for p in prompts:
        if key(p) not in held:
            todo.setdefault(key(p), p)
    if todo:
        held.update(zip(todo, load_text_encoder(config).token_embeddings(list(todo.values())), strict=True))
        write_file(path, held, identity, source)
    return {"path": str(path), "prompts": len(held), "encoded": len(todo), "seconds": time.perf_counter() - start}


def build_in_task(config_dict: dict, prompts: list[str]) -> dict:
    """`build` for a Ray task on the rollout role's resources (cluster/placement.encode_prompts)."""
    from common.config import Config

    config = Config.model_validate(config_dict)
    torch.set_num_threads(max(1, int(config.rollout.num_cpus_per_worker)))
    if config.model.prompt_cache is None:
        raise PromptCacheError("model.prompt_cache is not set; the job sets it before encoding the prompts")
    return build(config, prompts, config.model.prompt_cache)


# ---------------------------------------------------------------------------------------------
# What a role encodes with
# ---------------------------------------------------------------------------------------------


class CachedTextEncoder:
    """`encode(prompts)` as `TextEncoder.encode` returns it, read from `model.prompt_cache`.

    `encoder_on_miss=False` (learners): the encoder is never built, and a prompt missing from the file
    is an error naming the prompt and the file. `encoder_on_miss=True` (rollout workers, in-process
    tools): the encoder is built on the first prompt the file lacks, and keeps such prompts in its own
    in-memory cache. With no model.prompt_cache every prompt is a miss.
    """

    def __init__(self, config: Config, *, encoder_on_miss: bool):
        self.config = config
        self.encoder_on_miss = encoder_on_miss
        self.path = None if config.model.prompt_cache is None else Path(config.model.prompt_cache)
        if self.path is None and not encoder_on_miss:
            raise PromptCacheError(
                "model.prompt_cache is not set: a learner never loads the text encoder and "
                "reads prompt embeddings from the file the job writes (cluster.train sets it)"
            )
        self.file = None
        if self.path is not None:
            self.file = open_file(self.path, encoder_identity(config)[0])
            if self.file is None and not encoder_on_miss:
                raise PromptCacheError(
                    f"model.prompt_cache: no prompt-embedding file at {self.path}; the job "
                    "writes it before learners start (cluster/placement.encode_prompts)"
                )
        self._key = key_function(config)
        self.encoder = None  # built on the first miss

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), tokens, dim] on the CPU; zeros after each prompt's own tokens."""
        from common.model.loading import load_text_encoder, pad_tokens

        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        keys = [self._key(p) for p in prompts]
        rows = {k: self.file.get(k) for k in dict.fromkeys(keys) if self.file is not None and k in self.file}
        missing: dict[str, str] = {}  # key text -> the first prompt with it
        for k, p in zip(keys, prompts, strict=True):
            if k not in rows:
                missing.setdefault(k, p)
        if missing:
            if not self.encoder_on_miss:
                raise PromptCacheError(
                    f"prompt {next(iter(missing.values()))!r} is not in the prompt-embedding file "
                    f"{self.path} (model.prompt_cache; {len(missing)} prompt(s) missing), and a "
                    "learner never loads the text encoder; were prompts added after the job "
                    "started?"
                )
            if self.encoder is None:
                self.encoder = load_text_encoder(self.config)
            rows.update(zip(missing, self.encoder.token_embeddings(list(missing.values())), strict=True))
        shape = layout(self.config)
        if not keys:
            return torch.zeros(0, shape["tokens"], shape["dim"], dtype=getattr(torch, shape["dtype"]))
        return torch.stack([pad_tokens(rows[k], shape["tokens"]) for k in keys])
