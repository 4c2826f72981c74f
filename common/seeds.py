"""The one seed derivation: a seed from a text naming what it is for.

Every seeded stream in the project (a job's draws, a phase's, the learner's anchors, each noise
tensor, the toy world's word vectors) is derived from the parts that identify it rather than drawn
from one running generator, so it depends on those parts alone, never on who asks or in which order.
Each caller builds its own text (`f"{seed}/{phase}/{job}"`, `repr(parts)`, ...) and keeps as many
bits as its consumer takes: the text and the bit count are part of the seed, and changing either
changes every number drawn from it (tests/test_seeds.py pins values).
"""

from __future__ import annotations

import hashlib


def derive_seed(text: str, bits: int = 63) -> int:
    """The first 8 bytes of blake2b(text) as a little-endian integer, kept to its low `bits` bits
    (63 fits `torch.Generator.manual_seed`; 64 keeps all of it, for `random.Random`)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be 1 to 64 (the digest has 8 bytes), got {bits}")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)
