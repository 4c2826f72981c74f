"""A causal, chunk-by-chunk Wan transformer with a KV cache, built on diffusers' WanTransformer3DModel.

Self-Forcing makes Wan2.1 causal at the granularity of chunks of latent frames: a chunk attends to
itself (bidirectionally) and to every earlier chunk, never to later ones. This module adds that to
the diffusers model without copying it:

- `CausalWanTransformer3DModel` subclasses `WanTransformer3DModel` (same parameters, same state-dict
  keys, so diffusers weights, LoRA loaders and peft all work unchanged) and only replaces `forward`
  (same diffusers arguments and return convention, plus the cache's), to feed one timestep per
  latent frame, rotary positions offset by the chunk's start frame, and a `KVCache` to the blocks.
- `CausalWanAttnProcessor` replaces diffusers' `WanAttnProcessor` on every attention layer:
  self-attention reads earlier chunks' keys/values from the cache (or, in full-sequence mode,
  applies a block-causal mask), and cross-attention reuses the prompt's keys/values from the cache.
  It uses fused QKV projections when fused and diffusers' attention dispatcher (backends). A
  processor that cannot do causal caching is refused at the next forward.

The cache never holds a chunk during its own denoising: each chunk's keys/values are appended once,
by the "context" pass on the finished chunk (docs/method.md section 1). A forked cache shares its parent's
chunks read-only and appends its own, which is what lets G branches share one prefix. A cache made
with `capacity_frames` (the sampler's) keeps each block's keys/values in one preallocated buffer that
every no-grad forward writes its chunk into in place and attends over as a view: no per-step
concatenation, and a fork's batch-1 prefix is copied to the branches' batch once, not at every step.

Latents are laid out as diffusers does: [batch, channels, frames, height, width].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale


@dataclass
class CachedChunk:
    """Self-attention keys/values of one finished chunk, for every block."""

    start_frame: int
    num_frames: int
    keys: list[torch.Tensor | None]  # per block: [batch, tokens, heads, head_dim]
    values: list[torch.Tensor | None]

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.num_frames


@dataclass
class KVCache:
    """What later chunks need from earlier ones: their self-attention K/V, and the prompt's K/V.

    `local_attn_frames` / `sink_frames` reproduce Self-Forcing's optional local attention: a chunk
    ending at frame e sees frames [e - local_attn_frames, e) plus frames [0, sink_frames). Chunks
    that no later chunk can see are dropped, so memory stays bounded by the window.

    `capacity_frames` (global attention only) turns on the in-place path: per block, one buffer
    [batch, capacity_frames * tokens_per_frame, heads, head_dim] for keys and one for values,
    allocated at the first forward that reads it. A no-grad forward whose chunk starts where the
    cache ends writes its keys/values at their frames and attends over `buffer[:, :end]` (a view);
    a context pass's chunk entries are views of the buffer. Anything else (autograd, local
    attention, a batch or dtype other than the buffer's, a chunk placed elsewhere, full-sequence
    mode) takes the concatenating path, `gather`, which is also what a cache without capacity uses.
    The two paths attend over the same values in the same order, so they give the same bits.
    """

    num_blocks: int
    tokens_per_frame: int
    local_attn_frames: int | None = None
    sink_frames: int = 0
    chunks: list[CachedChunk] = field(default_factory=list)
    # Cross-attention K/V of the prompt, per block; they depend only on the prompt and the weights.
    # (k, v), or (k, v, image k, image v) for blocks with image K/V projections.
    text_kv: list[tuple[torch.Tensor, ...] | None] = field(default_factory=list)
    capacity_frames: int | None = None
    # Per block: (keys, values) buffers, and how many leading frames of them hold cached chunks.
    buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    buffered_frames: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.text_kv:
            self.text_kv = [None] * self.num_blocks
        if not self.buffers:
            self.buffers = [None] * self.num_blocks
            self.buffered_frames = [0] * self.num_blocks
        if self.capacity_frames is not None and self.local_attn_frames is not None:
            raise ValueError("capacity_frames (preallocated K/V) is for global attention; local attention evicts")

    @property
    def num_frames(self) -> int:
        return self.chunks[-1].end_frame if self.chunks else 0

    def fork(self, capacity_frames: int | None = None) -> KVCache:
        """A cache that shares everything cached so far (read-only) and appends on its own. With a
        capacity (`capacity_frames`, else this cache's) it gets its own buffers, filled from the
        shared chunks at its first forward."""
        return KVCache(
            num_blocks=self.num_blocks,
            tokens_per_frame=self.tokens_per_frame,
            local_attn_frames=self.local_attn_frames,
            sink_frames=self.sink_frames,
            chunks=list(self.chunks),
            text_kv=self.text_kv,  # shared on purpose: branches of one prompt reuse it
            capacity_frames=self.capacity_frames if capacity_frames is None else capacity_frames,
        )

    def begin_chunk(self, start_frame: int, num_frames: int) -> CachedChunk:
        if start_frame != self.num_frames:
            raise ValueError(
                f"cache holds frames [0, {self.num_frames}) but a chunk starting at frame "
                f"{start_frame} was written: chunks must be cached in order"
            )
        chunk = CachedChunk(start_frame, num_frames, [None] * self.num_blocks, [None] * self.num_blocks)
        self.chunks.append(chunk)
        return chunk

    def visible_frames(self, query_start: int, query_end: int) -> list[tuple[int, int]]:
        """Frame ranges [a, b) before `query_start` that a chunk [query_start, query_end) attends to."""
        if self.local_attn_frames is None:
            return [(0, query_start)] if query_start > 0 else []
        window_start = max(0, query_end - self.local_attn_frames)
        sink_end = min(self.sink_frames, query_start)
        if sink_end >= window_start:  # the sink and the window touch: one range
            return [(0, query_start)] if query_start > 0 else []
        ranges = [(0, sink_end)] if sink_end > 0 else []
        if window_start < query_start:
            ranges.append((window_start, query_start))
        return ranges

    def _pieces(self, block: int, a: int, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cached (keys, values) of one block covering frames [a, b), chunk by chunk."""
        pieces = []
        tpf = self.tokens_per_frame
        for chunk in self.chunks:
            lo, hi = max(a, chunk.start_frame), min(b, chunk.end_frame)
            if lo >= hi:
                continue
            k, v = chunk.keys[block], chunk.values[block]
            if k is None or v is None:
                raise RuntimeError(f"cached chunk at frame {chunk.start_frame} misses block {block}")
            s, e = (lo - chunk.start_frame) * tpf, (hi - chunk.start_frame) * tpf
            pieces.append((k[:, s:e], v[:, s:e]))
        return pieces

    def gather(self, block: int, query_start: int, query_end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached K/V of one block that a chunk may attend to, concatenated along tokens."""
        pieces = [p for a, b in self.visible_frames(query_start, query_end) for p in self._pieces(block, a, b)]
        if not pieces:
            return None
        keys, values = [k for k, _ in pieces], [v for _, v in pieces]
        # Chunks cached before a fork have batch 1 and are broadcast to the branches' batch.
        batch = max(k.shape[0] for k in keys)
        keys = [k.expand(batch, *k.shape[1:]) for k in keys]
        values = [v.expand(batch, *v.shape[1:]) for v in values]
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def attend_in_place(
        self, block: int, start_frame: int, k: torch.Tensor, v: torch.Tensor, write: CachedChunk | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The in-place path (see the class docstring): write this chunk's `k`, `v` [batch, tokens,
        heads, head_dim] into the block's buffer at its frames and return the keys/values it attends
        to, cached frames then its own, as views of the buffer. None where the path does not apply;
        the caller then concatenates (`gather`)."""
        if self.capacity_frames is None or torch.is_grad_enabled():
            return None
        tpf = self.tokens_per_frame
        cached_end = write.start_frame if write is not None else self.num_frames
        end = start_frame * tpf + k.shape[1]
        if start_frame != cached_end or end > self.capacity_frames * tpf or k.shape[1] % tpf:
            return None
        buffers = self.buffers[block]
        shape = (k.shape[0], self.capacity_frames * tpf, *k.shape[2:])
        if buffers is None:
            buffers = (k.new_empty(shape), v.new_empty(shape))
            self.buffers[block], self.buffered_frames[block] = buffers, 0
        kb, vb = buffers
        if kb.shape != shape or kb.dtype != k.dtype or vb.dtype != v.dtype or kb.device != k.device:
            return None
        # Bring the buffer up to the cached frames: a fork's shared prefix (batch 1, broadcast here
        # once per block) or chunks written by the concatenating path.
        filled = self.buffered_frames[block]
        if filled < start_frame:
            token = filled * tpf
            for ck, cv in self._pieces(block, filled, start_frame):
                n = ck.shape[1]
                kb[:, token : token + n].copy_(ck)
                vb[:, token : token + n].copy_(cv)
                token += n
            if token != start_frame * tpf:
                return None  # frames missing from the cache (a chunk placed past its end)
            self.buffered_frames[block] = start_frame
        s = start_frame * tpf
        kb[:, s:end].copy_(k)
        vb[:, s:end].copy_(v)
        if write is not None:
            write.keys[block], write.values[block] = kb[:, s:end], vb[:, s:end]
            self.buffered_frames[block] = write.end_frame
        return kb[:, :end], vb[:, :end]

    def evict(self, next_start_frame: int, next_num_frames: int) -> None:
        """Drop chunks that neither the next chunk nor any later one can see (local attention only)."""
        if self.local_attn_frames is None:
            return
        window_start = max(0, next_start_frame + next_num_frames - self.local_attn_frames)
        self.chunks = [c for c in self.chunks if c.end_frame > window_start or c.start_frame < self.sink_frames]

    def nbytes(self) -> int:
        """Bytes of the distinct storages the cache holds (buffers count whole, shared ones once)."""
        storages: dict[int, int] = {}
        tensors = [t for chunk in self.chunks for t in (*chunk.keys, *chunk.values)]
        tensors += [t for pair in self.buffers if pair is not None for t in pair]
        for t in tensors:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


@dataclass
class SelfAttnInputs:
    """What a causal self-attention processor gets, as the `rotary_emb` argument that
    WanTransformerBlock hands to `attn1`'s processor untouched: per-call state reaches processors
    without globals. A processor that declares `supports_causal_cache = True` reads this."""

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor
    start_frame: int
    num_frames: int
    cache: KVCache | None
    write: CachedChunk | None
    mask: torch.Tensor | None  # full-sequence mode only: boolean [tokens, tokens], True = may attend
    block: int = 0  # which block's cache entries to read and write


@dataclass
class CrossAttnInputs:
    """What a causal cross-attention processor gets, as `attn2`'s `encoder_hidden_states`."""

    text: torch.Tensor  # projected prompt embeddings [batch, tokens, dim]
    cache: KVCache | None
    # Projected image embeddings [batch, tokens, dim], for blocks with image K/V projections
    # (`added_kv_proj_dim`); None for a text-to-video model.
    image: torch.Tensor | None = None
    block: int = 0


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same pairing as diffusers' Wan processor: interleaved (even, odd) channels rotate together.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _rms_norm_fp32(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # Self-Forcing computes q/k norms in float32: in bf16 the error compounds over chunks.
    if (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and norm.weight is not None
        and norm.weight.dtype == x.dtype
    ):
        # torch's CPU kernel computes a bf16/fp16 input in float32 and rounds once: the bits of the
        # explicit path below (tests/test_causal_wan.py) in one pass instead of six (3.5x on a rollout's
        # q/k). Not assumed of other devices' kernels, nor of the backward.
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    weight = None if norm.weight is None else norm.weight.float()
    return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps).type_as(x)


# Backends of diffusers' dispatcher that apply an arbitrary boolean [query, key] mask. The others
# refuse a mask, or (the varlen kernels) reduce it to a key-padding mask over all queries, which
# would silently make full-sequence mode bidirectional.
MASK_BACKENDS = frozenset(
    {
        AttentionBackendName.NATIVE,
        AttentionBackendName._NATIVE_MATH,
        AttentionBackendName._NATIVE_EFFICIENT,
        AttentionBackendName.FLEX,
    }
)


def _projections(attn) -> dict[str, torch.nn.Module]:
    names = ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj")
    return {n: getattr(attn, n) for n in names if getattr(attn, n, None) is not None}


def _lora_wrapped(attn) -> list[str]:
    """Names of `attn`'s q/k/v (and image k/v) projections that peft has wrapped (LoRA adapters)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no adapters
        return []
    return [n for n, m in _projections(attn).items() if isinstance(m, BaseTunerLayer)]


class CausalWanAttnProcessor:
    """Attention for both attention layers of a Wan block run by CausalWanTransformer3DModel.

    Self-attention (`attn1`): block-causal over the current chunk and the cached keys/values of
    earlier chunks (or, in full-sequence mode, under a block-causal mask). Cross-attention
    (`attn2`): to the prompt (and image, for a model with image K/V projections), whose keys/values
    are computed once per cache. Like diffusers' WanAttnProcessor it uses the fused projections
    (`to_qkv`, `to_kv`, `to_added_kv`) after `fuse_qkv_projections()`, and computes attention
    through diffusers' `dispatch_attention_fn`, so `set_attention_backend` / `attention_backend`
    choose the kernel.

    `supports_causal_cache = True` is the contract the model checks before every forward: a
    processor class that declares it reads `SelfAttnInputs` (passed as `rotary_emb`) and
    `CrossAttnInputs` (passed as `encoder_hidden_states`), and honours the cache. Subclass this one
    to change only a part (e.g. override `attention`).
    """

    supports_causal_cache = True
    _attention_backend = None  # set by diffusers' set_attention_backend / reset_attention_backend
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if isinstance(rotary_emb, SelfAttnInputs):
            return self.self_attention(attn, hidden_states, rotary_emb)
        if isinstance(encoder_hidden_states, CrossAttnInputs):
            return self.cross_attention(attn, hidden_states, encoder_hidden_states)
        raise TypeError(
            f"{type(self).__name__} runs inside CausalWanTransformer3DModel.forward, which passes it "
            "SelfAttnInputs (as rotary_emb) or CrossAttnInputs (as encoder_hidden_states)"
        )

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[batch, tokens, heads, head_dim] in, [batch, tokens, heads * head_dim] out (q's dtype)."""
        if self._parallel_config is not None:
            raise NotImplementedError("CausalWanAttnProcessor does not support diffusers' context parallelism")
        if mask is not None:
            backend = self._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            if AttentionBackendName(backend) not in MASK_BACKENDS:
                names = ", ".join(sorted(b.value for b in MASK_BACKENDS))
                raise ValueError(
                    f"attention backend {AttentionBackendName(backend).value!r} cannot apply the block-causal "
                    f"mask of full-sequence mode (frames_per_chunk); use one of {names}, or stream chunk by "
                    "chunk with a KV cache, which needs no mask"
                )
            mask = mask[None, None]  # [1, 1, q, k]: no backend mistakes it for a [batch, key] padding mask
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=None)
        return out.flatten(2, 3).type_as(q)

    def self_attention(self, attn, hidden_states: torch.Tensor, ctx: SelfAttnInputs) -> torch.Tensor:
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = _rms_norm_fp32(attn.norm_q, q).unflatten(2, (attn.heads, -1))
        k = _rms_norm_fp32(attn.norm_k, k).unflatten(2, (attn.heads, -1))
        v = v.contiguous().unflatten(2, (attn.heads, -1))  # fused: a view would keep all of q, k, v alive
        q = _apply_rotary(q, ctx.freqs_cos, ctx.freqs_sin)
        k = _apply_rotary(k, ctx.freqs_cos, ctx.freqs_sin)

        in_place = None
        if ctx.cache is not None and ctx.mask is None:
            in_place = ctx.cache.attend_in_place(ctx.block, ctx.start_frame, k, v, ctx.write)
        if ctx.write is not None and in_place is None:
            # Later chunks never backpropagate into this one (docs/method.md section 3: the cache is a constant).
            ctx.write.keys[ctx.block] = k.detach()
            ctx.write.values[ctx.block] = v.detach()

        keys, values = k, v
        if in_place is not None:
            keys, values = in_place
        elif ctx.cache is not None and ctx.mask is None:
            cached = ctx.cache.gather(ctx.block, ctx.start_frame, ctx.start_frame + ctx.num_frames)
            if cached is not None:
                ck, cv = cached
                if ck.shape[0] != k.shape[0]:
                    ck, cv = ck.expand(k.shape[0], *ck.shape[1:]), cv.expand(k.shape[0], *cv.shape[1:])
                keys = torch.cat([ck.to(k.dtype), k], dim=1)
                values = torch.cat([cv.to(v.dtype), v], dim=1)

        out = self.attention(q, keys, values, ctx.mask)
        return attn.to_out[1](attn.to_out[0](out))

    def _context_kv(self, attn, ctx: CrossAttnInputs) -> tuple[torch.Tensor, ...]:
        if attn.fused_projections:
            k, v = attn.to_kv(ctx.text).chunk(2, dim=-1)
        else:
            k, v = attn.to_k(ctx.text), attn.to_v(ctx.text)
        kv = (
            _rms_norm_fp32(attn.norm_k, k).unflatten(2, (attn.heads, -1)),
            v.contiguous().unflatten(2, (attn.heads, -1)),
        )
        if attn.add_k_proj is None:
            return kv
        if ctx.image is None:
            raise ValueError(
                "this block has image K/V projections (added_kv_proj_dim): pass encoder_hidden_states_image"
            )
        if attn.fused_projections:
            k_img, v_img = attn.to_added_kv(ctx.image).chunk(2, dim=-1)
        else:
            k_img, v_img = attn.add_k_proj(ctx.image), attn.add_v_proj(ctx.image)
        k_img = _rms_norm_fp32(attn.norm_added_k, k_img).unflatten(2, (attn.heads, -1))
        return (*kv, k_img, v_img.contiguous().unflatten(2, (attn.heads, -1)))

    def cross_attention(self, attn, hidden_states: torch.Tensor, ctx: CrossAttnInputs) -> torch.Tensor:
        cache = ctx.cache
        # Reuse cached K/V only without autograd: a trained forward must see gradients flow into the
        # cross-attention projections (LoRA), which a K/V computed under no_grad would cut.
        use_cache = cache is not None and not torch.is_grad_enabled()
        kv = cache.text_kv[ctx.block] if use_cache else None
        if kv is None:
            kv = self._context_kv(attn, ctx)
            if use_cache:
                cache.text_kv[ctx.block] = kv
        q = _rms_norm_fp32(attn.norm_q, attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        batch = q.shape[0]
        kv = tuple(t.expand(batch, *t.shape[1:]) if t.shape[0] != batch else t for t in kv)  # one prompt, G branches
        out = self.attention(q, kv[0], kv[1], None)
        if len(kv) == 4:  # image cross-attention (Wan I2V): its own softmax, added
            out = out + self.attention(q, kv[2], kv[3], None)
        return attn.to_out[1](attn.to_out[0](out))


def block_causal_mask(
    num_frames: int,
    frames_per_chunk: int,
    tokens_per_frame: int,
    local_attn_frames: int | None = None,
    sink_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean [tokens, tokens] mask (True = may attend) equal to what streaming with a cache sees."""
    frame = torch.arange(num_frames, device=device)
    chunk_end = (frame // frames_per_chunk + 1) * frames_per_chunk  # exclusive end of each frame's chunk
    q_end, key = chunk_end[:, None], frame[None, :]
    allowed = key < q_end
    if local_attn_frames is not None:
        allowed &= (key >= q_end - local_attn_frames) | (key < sink_frames)
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """WanTransformer3DModel run chunk by chunk with a KV cache (see the module docstring).

    `forward(x, frame_timesteps, text, return_dict=False, start_frame=..., cache=..., write_cache=...)[0]`
    is the flow prediction for the frames in `x`, which start at absolute frame `start_frame`. The
    diffusers arguments and return convention are WanTransformer3DModel's, so the class drops into a
    stock pipeline (one chunk, no cache: diffusers' output bit for bit).
    """

    # The signature stays WanTransformer3DModel's (functools.wraps): diffusers reads the config keys
    # from it, so from_pretrained / from_config / save_pretrained keep working.
    @functools.wraps(WanTransformer3DModel.__init__)
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_causal_processors()

    def use_causal_processors(self) -> None:
        """Install a CausalWanAttnProcessor on every attention layer (done at construction; call it
        again to undo a `set_attn_processor`). A backend chosen with `set_attention_backend` is kept."""
        for block in self.blocks:
            for attn in (block.attn1, block.attn2):
                processor = CausalWanAttnProcessor()
                processor._attention_backend = getattr(attn.processor, "_attention_backend", None)
                attn.set_processor(processor)

    def _check_attention(self) -> None:
        """Refuse, before any work, processors that cannot run block-causal attention over the cache
        (a `set_attn_processor(AttnProcessor())`, say: it would attend bidirectionally and ignore the
        cache), and fused projections next to LoRA adapters that the fused matmul would skip."""
        for i, block in enumerate(self.blocks):
            for name, attn in (("attn1", block.attn1), ("attn2", block.attn2)):
                processor = attn.processor
                if not getattr(processor, "supports_causal_cache", False):
                    raise TypeError(
                        f"blocks.{i}.{name}.processor is {type(processor).__name__}, which cannot do "
                        "CausalWanTransformer3DModel's block-causal attention over its KV cache (it does not "
                        "declare `supports_causal_cache = True`); use CausalWanAttnProcessor "
                        "(model.use_causal_processors()) or a processor that declares it and reads "
                        "SelfAttnInputs / CrossAttnInputs"
                    )
                if attn.fused_projections and (wrapped := _lora_wrapped(attn)):
                    raise ValueError(
                        f"blocks.{i}.{name} runs fused QKV projections but LoRA adapters sit on {wrapped}, "
                        "which the fused matmul would skip: call unfuse_qkv_projections() before adding adapters"
                    )

    def fuse_qkv_projections(self) -> None:
        """diffusers' fusion (one `to_qkv` matmul in self-attention, one `to_kv` in cross-attention),
        refused while peft LoRA adapters wrap to_q / to_k / to_v: the fused weight is the base weight
        only, so it would silently drop them. Merge and unload the adapters first (the export's fused
        weights, or `fuse_lora()` then `unload_lora()`), then fuse."""
        wrapped = sorted({n for block in self.blocks for a in (block.attn1, block.attn2) for n in _lora_wrapped(a)})
        if wrapped:
            raise ValueError(
                f"fuse_qkv_projections() with LoRA adapters on {wrapped} would drop them from the fused "
                "projection; merge and unload the adapters first (fuse_lora() then unload_lora())"
            )
        super().fuse_qkv_projections()

    def cast(self, dtype: torch.dtype) -> CausalWanTransformer3DModel:
        """Cast to `dtype` but keep diffusers' `_keep_in_fp32_modules` (time embedding, modulation,
        norms, rope) in float32, as `from_pretrained(torch_dtype=...)` does for loaded weights."""
        keep = set(self._keep_in_fp32_modules or [])
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            target = torch.float32 if keep.intersection(name.split(".")) else dtype
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(target)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the patch embedding's. Not the first parameter's, which may
        be one of the modules `cast` keeps in float32."""
        return self.patch_embedding.weight.dtype

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def new_cache(self, height: int, width: int, local_attn_frames: int | None = None, sink_frames: int = 0) -> KVCache:
        return KVCache(
            num_blocks=len(self.blocks),
            tokens_per_frame=self.tokens_per_frame(height, width),
            local_attn_frames=local_attn_frames,
            sink_frames=sink_frames,
        )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        start_frame: int = 0,
        cache: KVCache | None = None,
        write_cache: bool = False,
        frames_per_chunk: int | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Flow prediction for `hidden_states` [B, C, F, H, W]: a `Transformer2DModelOutput` (its
        `.sample`), or the tuple `(flow,)` with `return_dict=False`, as WanTransformer3DModel returns it.

        timestep: [B] (one per sample) or [B, F] (one per latent frame, as Self-Forcing feeds it).
        encoder_hidden_states_image: image embeddings, only for a model built with `image_dim`.
        attention_kwargs: as diffusers' Wan reads it: `scale` weights peft LoRA layers for this call;
        other keys are ignored.
        Streaming mode (`frames_per_chunk` None): the frames form one chunk that attends to `cache`.
        Full-sequence mode (`frames_per_chunk` set): the frames are a whole video from frame 0,
        split into chunks under a block-causal mask; with `write_cache` every chunk's K/V go into
        `cache` (the one-pass rebuild of h_{p-1}).
        """
        self._check_attention()
        has_image_kv = self.config.added_kv_proj_dim is not None
        if encoder_hidden_states_image is not None and self.condition_embedder.image_embedder is None:
            raise ValueError(
                "encoder_hidden_states_image was given, but this is a text-to-video model (built without "
                "image_dim): it has no image embedder; pass None"
            )
        if encoder_hidden_states_image is None and has_image_kv:
            raise ValueError(
                "this model has image K/V projections (added_kv_proj_dim): pass encoder_hidden_states_image"
            )
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if p_t != 1:
            raise ValueError("causal chunking needs a temporal patch size of 1")
        ppf, pph, ppw = num_frames, height // p_h, width // p_w
        tokens_per_frame = pph * ppw

        # Rotary angles for absolute frames [start_frame, start_frame + F): ask diffusers' rope for
        # the longer video (it reads only the shape) and keep the tail.
        shape_probe = hidden_states.new_empty((1, 0, start_frame + num_frames, height, width))
        freqs_cos, freqs_sin = self.rope(shape_probe)
        first = start_frame * tokens_per_frame
        freqs_cos, freqs_sin = freqs_cos[:, first:], freqs_sin[:, first:]

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        if timestep.ndim == 1:
            # One timestep per sample (every frame of a streamed chunk shares it): embed it once per
            # sample, exactly as WanTransformer3DModel does, and let it broadcast over tokens.
            temb, timestep_proj, text, image = self.condition_embedder(
                timestep, encoder_hidden_states, encoder_hidden_states_image
            )
            timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, dim]
        elif timestep.shape == (batch, num_frames):
            # One timestep per frame (full-sequence mode): embed per frame, broadcast to its tokens.
            temb, timestep_proj, text, image = self.condition_embedder(
                timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=num_frames
            )
            temb = temb.repeat_interleave(tokens_per_frame, dim=1)  # [B, tokens, dim]
            timestep_proj = timestep_proj.unflatten(2, (6, -1)).repeat_interleave(tokens_per_frame, dim=1)
        else:
            raise ValueError(f"timestep must be [B] or [B, F]=({batch}, {num_frames}), got {tuple(timestep.shape)}")

        mask, write = None, None
        if frames_per_chunk is not None:
            if start_frame != 0 or num_frames % frames_per_chunk:
                raise ValueError("full-sequence mode needs whole chunks starting at frame 0")
            if cache is not None and cache.num_frames:
                raise ValueError("full-sequence mode rebuilds a cache; pass an empty one")
            local = cache.local_attn_frames if cache is not None else None
            sink = cache.sink_frames if cache is not None else 0
            mask = block_causal_mask(num_frames, frames_per_chunk, tokens_per_frame, local, sink, x.device)
            if write_cache:
                if cache is None:
                    raise ValueError("write_cache needs a cache")
                write = cache.begin_chunk(0, num_frames)
        elif write_cache:
            if cache is None:
                raise ValueError("write_cache needs a cache")
            write = cache.begin_chunk(start_frame, num_frames)

        if image is not None and not has_image_kv:
            # Without image K/V projections diffusers attends to the image tokens as extra text tokens.
            text, image = torch.cat([image, text], dim=1), None
        for i, block in enumerate(self.blocks):
            self_ctx = SelfAttnInputs(freqs_cos, freqs_sin, start_frame, num_frames, cache, write, mask, block=i)
            cross_ctx = CrossAttnInputs(text, cache, image, block=i)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cross_ctx, timestep_proj, self_ctx)
            else:
                x = block(x, cross_ctx, timestep_proj, self_ctx)

        if write is not None and frames_per_chunk is not None:
            _split_written(cache, write, frames_per_chunk)
        if cache is not None and write is not None:
            cache.evict(cache.num_frames, frames_per_chunk or num_frames)

        if temb.ndim == 3:  # per token
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(batch, ppf, pph, ppw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def _split_written(cache: KVCache, written: CachedChunk, frames_per_chunk: int) -> None:
    """A full-sequence pass wrote the whole video as one entry; store it as per-chunk entries so a
    rebuilt cache is laid out exactly as a streamed one (and local-window eviction works per chunk)."""
    cache.chunks.pop()
    tpf = cache.tokens_per_frame
    for start in range(written.start_frame, written.end_frame, frames_per_chunk):
        s, e = (start - written.start_frame) * tpf, (start - written.start_frame + frames_per_chunk) * tpf
        cache.chunks.append(
            CachedChunk(
                start,
                frames_per_chunk,
                [k[:, s:e] for k in written.keys],
                [v[:, s:e] for v in written.values],
            )
        )
