"""trl-qaloss: an order-invariant answer-set loss for TRL's SFTTrainer."""

from .config import QALossConfig
from .loss import SetLossOutput, set_matching_loss
from .separators import QASeparators
from .trainer import QALossSFTTrainer

__all__ = ["QALossConfig", "QALossSFTTrainer", "QASeparators", "SetLossOutput", "set_matching_loss"]
__version__ = "0.1.0"
