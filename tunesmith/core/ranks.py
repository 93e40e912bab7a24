"""Which process this is under torchrun / accelerate / Ray, from the environment."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def say(msg: str) -> None:
    """Print one line for the user, from rank 0 only."""
    if rank() == 0:
        print(msg, flush=True)
