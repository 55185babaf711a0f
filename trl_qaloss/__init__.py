"""trl-qaloss: an order-invariant answer-set loss for TRL's SFTTrainer."""

from . import _log_filters  # noqa: F401  (before the imports that load bitsandbytes)
from .answer_order import ANSWER_ORDERS, reorder_answers
from .callbacks import QASetEvalCallback
from .config import QALossConfig
from .loss import SetLossOutput, set_matching_loss
from .metrics import answer_set_scores
from .separators import QASeparators
from .trainer import QALossSFTTrainer

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
