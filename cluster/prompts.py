"""Training and held-out prompts: a prompt file from the config, or the toy world's split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

MAX_PROMPT_CHARS = 2000


class PromptError(ValueError):
    """A prompt file that cannot be trained on; names the file and line."""


def read_prompt_file(path: Path, key: str = "rollout.prompts") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{key}: no file at {path}")
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
    """(training prompts, held-out prompts). The held-out ones (run.out_of_domain.prompts, or the
    toy world's held-out split) are never trained on: a held-out prompt that is also a training
    prompt is refused, naming both files."""
    from common.config import is_toy_world

    ood = config.run.out_of_domain
    if config.rollout.prompts is not None:
        train = read_prompt_file(config.rollout.prompts)
    elif is_toy_world(config.model):
        from common.toy.world import split_prompts

        toy_train, toy_heldout = split_prompts(seed=0)
        train = [p.text for p in toy_train]
        if ood is None or ood.prompts is None:
            return train, [p.text for p in toy_heldout]
    else:
        raise PromptError("rollout.prompts is not set (a UTF-8 text file, one prompt per line)")
    if ood is None or ood.prompts is None:
        return train, []
    heldout = read_prompt_file(ood.prompts, key="run.out_of_domain.prompts")
    shared = [p for p in dict.fromkeys(heldout) if p in set(train)]
    if shared:
        source = config.rollout.prompts or "the toy world's training prompts"
        raise PromptError(
            f"run.out_of_domain.prompts ({ood.prompts}) shares {len(shared)} prompt(s) with {source}, e.g. "
            f"{shared[0]!r}: held-out prompts must never be trained on"
        )
    return train, heldout
