"""Training and held-out prompts: a prompt file from the config, or the toy world's split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

MAX_PROMPT_CHARS = 2000


class PromptError(ValueError):
    """A prompt file that cannot be trained on; names the file and line."""


def read_prompt_file(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"rollout.prompts: no file at {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptError(f"{path}:{line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise PromptError(f"{path}:{number}: prompt of {len(line)} characters (limit {MAX_PROMPT_CHARS})")
        prompts.append(line)
    if not prompts:
        raise PromptError(f"{path}: no prompts (empty or only comments)")
    return prompts


def load_prompts(config: Config) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts). The held-out ones are never trained on."""
    if config.rollout.prompts is not None:
        prompts = read_prompt_file(config.rollout.prompts)
        return prompts, []
    from common.config import is_toy_world

    if is_toy_world(config.model):
        from common.toy.world import split_prompts

        train, heldout = split_prompts(seed=0)
        return [p.text for p in train], [p.text for p in heldout]
    raise PromptError("rollout.prompts is not set (a UTF-8 text file, one prompt per line)")
