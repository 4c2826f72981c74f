"""Errors every role may raise or catch."""


class RewardError(ValueError):
    """A reward that must not enter a GRPO group (missing, non-finite, wrong shape); names the culprit."""
