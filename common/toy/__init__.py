"""The toy world: procedural prompts and clips, a seeded stand-in text encoder (world). The toy
rewards that score it are a reward model like any other (rewards/toy.py)."""
