"""Which checkpoints a resume may load: only those the Trainer finished writing.

`Trainer._save_checkpoint` writes into `checkpoint-N` directly: the weights, then the optimizer, scheduler and RNG
states, and `trainer_state.json` last. A run killed while saving leaves a `checkpoint-N` without a readable
`trainer_state.json`, and `transformers.trainer_utils.get_last_checkpoint` (highest N) would pick it for
`resume_from_checkpoint=True`. Complete means: `trainer_state.json` parses, so everything written before it is there.
"""

from __future__ import annotations

import json
import os
import re

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint the Trainer finished saving (its `trainer_state.json` was written last)."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The `checkpoint-N` of `folder` with the highest N among the complete ones, or None."""
    if not os.path.isdir(folder):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name)))
    for _, name in reversed(steps):
        if is_complete_checkpoint(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """`resume_from_checkpoint` as `Trainer.train` takes it, with `True` meaning the last COMPLETE checkpoint.

    Raises:
        ValueError: if no complete checkpoint exists, or the given path is not a complete checkpoint.
    """
    if resume_from_checkpoint is True:
        path = last_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"No complete checkpoint in `output_dir`={str(output_dir)!r} (one whose {TRAINER_STATE_NAME} was "
                "written). Start without `resume_from_checkpoint`, or pass a checkpoint directory."
            )
        return path
    if isinstance(resume_from_checkpoint, (str, os.PathLike)) and not is_complete_checkpoint(resume_from_checkpoint):
        last = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
        fix = f"Resume from {last!r} instead." if last else "Start without `resume_from_checkpoint`."
        raise ValueError(
            f"`resume_from_checkpoint`={str(resume_from_checkpoint)!r} is not a complete checkpoint: it has no "
            f"readable {TRAINER_STATE_NAME}, the file the Trainer writes last (was the run stopped while saving?). "
            + fix
        )
    return resume_from_checkpoint
