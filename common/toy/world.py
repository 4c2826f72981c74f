"""A procedural text-to-video world small enough to train and align on two CPU cores.

Prompts name an object colour, a shape, a direction and a background: "a red circle moving left on
a black background". `render` draws the matching clip (anti-aliased, random start, about one pixel a
frame in the stated direction, and at each chunk boundary the velocity either kept or re-drawn: a
later chunk is NOT determined by the earlier ones, as in real video), which is the data the toy
generator is pre-trained on and what the toy rewards compare against.
`ToyTextEncoder` stands in for UMT5 with the same interface: prompts in, [B, tokens, dim] out.

Videos are float tensors in [-1, 1], [B, 3, F, H, W], like the generator's pixel-space output.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from common.seeds import derive_seed

# RGB in [0, 1]. Object colours and backgrounds never coincide.
COLOURS = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.90),
}
BACKGROUNDS = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.35, 0.20, 0.05),
}
SHAPES = ("circle", "square", "cross")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy)
OBJECT_RADIUS = 3.0
# Per-chunk motion freedom (see `chunk_velocities`): a chunk keeps the previous chunk's velocity with
# KEEP_PROBABILITY, else draws a new one (speed x U(0.7, 1.3) along the direction, a perpendicular
# drift of U(-0.3, 0.3) px/frame). Real videos' later chunks are not determined by the earlier ones:
# these are the toy world's, so a chunk's noise has something to choose, and motion quality (MQ)
# can tell a smooth continuation (the same velocity) from a rough one.
VARIATION = 0.3
KEEP_PROBABILITY = 0.5


@dataclass(frozen=True)
class ToyPrompt:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> ToyPrompt:
        words = text.strip().lower().split()
        pattern = ["a", None, None, "moving", None, "on", "a", None, "background"]
        if len(words) != len(pattern) or any(p is not None and w != p for w, p in zip(words, pattern, strict=True)):
            raise ValueError(
                f"not a toy prompt: {text!r} (expected 'a <colour> <shape> moving <direction> "
                f"on a <background> background')"
            )
        colour, shape, direction, background = words[1], words[2], words[4], words[7]
        for word, vocab, kind in (
            (colour, COLOURS, "colour"),
            (shape, SHAPES, "shape"),
            (direction, DIRECTIONS, "direction"),
            (background, BACKGROUNDS, "background"),
        ):
            if word not in vocab:
                raise ValueError(f"unknown {kind} {word!r} in {text!r}; known: {sorted(vocab)}")
        return cls(colour, shape, direction, background)


def all_prompts() -> list[ToyPrompt]:
    return [ToyPrompt(*combo) for combo in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def split_prompts(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[list[ToyPrompt], list[ToyPrompt]]:
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    n_held = int(round(len(prompts) * held_out_fraction))
    return prompts[n_held:], prompts[:n_held]


def _signed_inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Distance inside the shape's edge (negative outside), in pixels."""
    if shape == "circle":
        return r - torch.sqrt(dx**2 + dy**2)
    if shape == "square":
        return r * 0.85 - torch.maximum(dx.abs(), dy.abs())
    if shape == "cross":
        arm = 1.0
        horizontal = torch.minimum(arm - dy.abs(), r - dx.abs())
        vertical = torch.minimum(arm - dx.abs(), r - dy.abs())
        return torch.maximum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}")


def object_alpha(shape: str, cx: torch.Tensor, cy: torch.Tensor, size: int, r: float = OBJECT_RADIUS) -> torch.Tensor:
    """Anti-aliased coverage [F, H, W] of the shape centred at (cx[t], cy[t])."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None]
    dy = coords[None, :, None] - cy[:, None, None]
    return (_signed_inside(shape, dx, dy, r) + 0.5).clamp(0.0, 1.0)


def chunk_velocities(
    prompt: ToyPrompt,
    num_chunks: int,
    speed: float,
    rng: random.Random,
    variation: float = VARIATION,
    keep_probability: float = KEEP_PROBABILITY,
) -> list[tuple[float, float]]:
    """One (vx, vy) per chunk, pixels per frame. The first chunk draws its velocity: the stated
    direction at `speed` times U(1 - variation, 1 + variation), plus a perpendicular drift of `speed`
    times U(-variation, variation); each later chunk keeps the previous chunk's velocity with
    `keep_probability`, else draws a fresh one the same way. `variation` 0: constant velocity."""
    ux, uy = DIRECTIONS[prompt.direction]
    px, py = -uy, ux  # perpendicular

    def draw() -> tuple[float, float]:
        along = speed * (1 + rng.uniform(-variation, variation))
        across = speed * rng.uniform(-variation, variation)
        return along * ux + across * px, along * uy + across * py

    velocities = [draw()]
    for _ in range(num_chunks - 1):
        velocities.append(velocities[-1] if rng.random() < keep_probability else draw())
    return velocities


def render(
    prompt: ToyPrompt | str,
    num_frames: int = 8,
    size: int = 16,
    speed: float = 1.0,
    seed: int = 0,
    frames_per_chunk: int = 2,
    variation: float = VARIATION,
    keep_probability: float = KEEP_PROBABILITY,
) -> torch.Tensor:
    """The clip a prompt describes, [3, F, H, W] in [-1, 1]. The object moves in the stated direction
    at about `speed` pixels a frame; per chunk of `frames_per_chunk` frames it keeps its velocity or
    changes it (`chunk_velocities`), and the start position is random, chosen so the whole path stays
    inside the frame. Everything random depends on `seed` only."""
    if isinstance(prompt, str):
        prompt = ToyPrompt.parse(prompt)
    rng = random.Random(seed)
    num_chunks = -(-num_frames // frames_per_chunk)
    velocities = chunk_velocities(prompt, num_chunks, speed, rng, variation, keep_probability)
    # Frame t (t >= 1) moves by its chunk's velocity: frame 1 already shows chunk 0's.
    steps = torch.tensor([(0.0, 0.0)] + [velocities[t // frames_per_chunk] for t in range(1, num_frames)])
    path = steps.cumsum(0)  # [F, 2] offsets from the start
    margin = OBJECT_RADIUS + 0.5

    def start(offsets: torch.Tensor) -> float:
        lo, hi = margin - offsets.min().item(), size - margin - offsets.max().item()
        return rng.uniform(lo, max(lo, hi))

    cx = start(path[:, 0]) + path[:, 0]
    cy = start(path[:, 1]) + path[:, 1]
    alpha = object_alpha(prompt.shape, cx, cy, size)[None]  # [1, F, H, W]
    obj = torch.tensor(COLOURS[prompt.colour])[:, None, None, None]
    bg = torch.tensor(BACKGROUNDS[prompt.background])[:, None, None, None]
    return (bg * (1 - alpha) + obj * alpha) * 2.0 - 1.0


def render_batch(
    prompts, num_frames: int = 8, size: int = 16, speed: float = 1.0, seeds=None, **motion
) -> torch.Tensor:
    """`render` for each prompt; `motion`: render's frames_per_chunk, variation, keep_probability."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    return torch.stack([render(p, num_frames, size, speed, s, **motion) for p, s in zip(prompts, seeds, strict=True)])


def _word_vector(seed: int, slot: int, word: str, dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(f"{seed}/{slot}/{word}"))
    return torch.randn(dim, generator=gen)


class ToyTextEncoder:
    """One token per attribute (colour, shape, direction, background): a fixed seeded vector for the
    word plus one for its slot. Deterministic, so no weights need shipping."""

    num_tokens = 4

    def __init__(self, dim: int = 16, seed: int = 0):
        self.dim, self.seed = dim, seed
        self._table = {}
        for slot, vocab in enumerate((COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)):
            slot_vec = _word_vector(seed, slot, "<slot>", dim)
            for word in vocab:
                self._table[(slot, word)] = (_word_vector(seed, slot, word, dim) + 0.5 * slot_vec) / 1.2

    def encode(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for text in prompts:
            p = ToyPrompt.parse(text)
            words = (p.colour, p.shape, p.direction, p.background)
            rows.append(torch.stack([self._table[(slot, w)] for slot, w in enumerate(words)]))
        return torch.stack(rows)

    def token_embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's [num_tokens, dim] (every toy prompt fills all its tokens), as a prompt-embedding
        file stores them (common/model/prompt_cache.py)."""
        return list(self.encode(prompts))
