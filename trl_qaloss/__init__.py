"""trl-qaloss: an order-invariant answer-set loss for TRL's SFTTrainer.

The public names below are imported on first use, as transformers and TRL do, so that `import trl_qaloss` (and the
command line's `--help`) loads no model code. The package has three layers: `trl_qaloss.engine`, the loss engine
(tensor code, no TRL); the TRL integration (`config`, `trainer`, `callbacks`, `data`, `metrics`, ...); the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _log_filters  # noqa: F401  (before any import that loads bitsandbytes)

# Each public name and the module that defines it.
_EXPORTS = {
    "ANSWER_ORDERS": "engine.options",
    "QALossConfig": "config",
    "QALossSFTTrainer": "trainer",
    "QASeparators": "engine.separators",
    "QASetEvalCallback": "callbacks",
    "SetLossOutput": "engine.loss",
    "answer_set_scores": "metrics",
    "reorder_answers": "engine.answer_order",
    "set_matching_loss": "engine.loss",
}

__all__ = [
    "ANSWER_ORDERS",
    "QALossConfig",
    "QALossSFTTrainer",
    "QASeparators",
    "QASetEvalCallback",
    "SetLossOutput",
    "answer_set_scores",
    "reorder_answers",
    "set_matching_loss",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .callbacks import QASetEvalCallback
    from .config import QALossConfig
    from .engine.answer_order import reorder_answers
    from .engine.loss import SetLossOutput, set_matching_loss
    from .engine.options import ANSWER_ORDERS
    from .engine.separators import QASeparators
    from .metrics import answer_set_scores
    from .trainer import QALossSFTTrainer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
