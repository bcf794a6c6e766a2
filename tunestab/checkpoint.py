"""A trial's checkpoint file: written atomically with a clear error when the disk is full, read
back newest first, skipping one that is truncated or corrupt.

A checkpoint holds the model, the optimizer, the data position, the RNG states and the
divergence rule's state, so that a resumed trial reports the same losses as one that was never
interrupted. It is always loaded to the CPU: `load_state_dict` then copies each tensor to where
its parameter lives, and the RNG states stay CPU ByteTensors, which `torch.set_rng_state`
requires (mapped to CUDA, they made every resume on a GPU fail).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of those to resume from can be read."""


def save_checkpoint(path: Path, state: dict, step: int) -> None:
    """Write `state` to `path` atomically; a failed write raises CheckpointError and leaves any
    earlier checkpoint as it was."""
    tmp = path.with_suffix(".tmp")
    try:
        # Through a Python file, so that a failed write raises OSError with its errno ("No
        # space left on device"); torch.save(state, path) reports only a position mismatch.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint.pt
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # A write that fails inside torch's zip writer surfaces as its RuntimeError ("unexpected
        # pos ...") raised while handling the OSError that says what happened.
        cause = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        raise CheckpointError(
            f"cannot write the checkpoint of step {step} to {path.parent}: {cause}; "
            "the previous checkpoint is untouched"
        ) from e


def load_checkpoint(folders) -> tuple[dict | None, str | None]:
    """The first readable checkpoint of `folders` (newest first), on the CPU, and its folder. A
    truncated or corrupt one is skipped with a warning: the one before it is still a good place
    to resume. `weights_only=True`: a checkpoint is data, never code to run."""
    bad = []
    for folder in folders:
        path = Path(folder) / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            # torch's first sentence says what failed; the rest is advice the message gives anyway.
            why = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
            bad.append(f"{path}: unreadable (truncated or corrupt?): {why}")
            continue
        for line in bad:
            print(f"warning: skipping checkpoint {line}", file=sys.stderr)
        return state, str(folder)
    if bad:
        raise CheckpointError("no readable checkpoint to resume from:\n  - " + "\n  - ".join(bad))
    return None, None
