"""Checkpoints of a run: checkpoints/ckpt-<seq>/ {learner.pt, adapters/, driver.json, COMPLETE}.

Written whole or not at all (a temporary folder renamed into place); `--resume` takes the newest
folder with COMPLETE.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from common.durable import replace_directory, write_bytes_atomic


def write_checkpoint(root, learner, state: dict) -> str:
    """checkpoints/ckpt-<seq>/ {learner.pt, adapters/, driver.json, COMPLETE}, built in a temporary
    folder and renamed into place, so a crash at any moment leaves either the whole checkpoint or
    none (the newest folder with COMPLETE is what --resume takes)."""
    import ray

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seq = 1 + max([int(p.name.split("-")[1]) for p in root.glob("ckpt-*")] or [0])
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        ray.get([learner.save_state.remote(str(tmp / "learner.pt")), learner.save.remote(str(tmp / "adapters"))])
        body = json.dumps({**state, "seq": seq}, indent=2).encode()
        for name, data in (("driver.json", body), ("COMPLETE", b"ok\n")):
            write_bytes_atomic(tmp / name, data)
        final = replace_directory(tmp, root / f"ckpt-{seq:06d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def latest_checkpoint(root):
    """The newest complete checkpoint folder, or None."""
    done = [p for p in Path(root).glob("ckpt-*") if (p / "COMPLETE").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def read_checkpoint_state(checkpoint) -> dict:
    """The driver's state saved in a checkpoint (driver.json): completed phases, where the schedule
    stood, the weight version and the counters."""
    return json.loads((Path(checkpoint) / "driver.json").read_text())
