"""trl-qaloss: an order-invariant answer-set loss for TRL's SFTTrainer.

The public names below are imported on first use, as transformers and TRL do, so that `import trl_qaloss` (and the
command line's `--help`) loads no model code. The package has three layers: `trl_qaloss.engine`, the loss engine
(tensor code, no TRL); the TRL integration (`config`, `trainer`, `callbacks`, `data`, `metrics`, ...); the command line.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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
# Modules that live in a layer's subpackage, importable under their earlier top-level names too.
_MOVED_MODULES = {f"{__name__}.inference": f"{__name__}.cli.inference"}
_MOVED_MODULES |= {
    f"{__name__}.{name}": f"{__name__}.engine.{name}"
    for name in (
        "answer_order",
        "logprobs",
        "loss",
        "matching",
        "parsing",
        "reduction",
        "reference",
        "separators",
        "similarity",
    )
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


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module's old name as the module itself (one module object under both names)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(_MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import system stamps `spec` on the module next
        return module

    def exec_module(self, module):
        # The module keeps its own spec, not the old name's.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
