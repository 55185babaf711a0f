"""trl-qaloss: an order-invariant answer-set loss for TRL's SFTTrainer."""

from .loss import SetLossOutput, set_matching_loss
from .separators import QASeparators

__all__ = ["QASeparators", "SetLossOutput", "set_matching_loss"]
__version__ = "0.1.0"
