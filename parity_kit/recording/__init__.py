"""Recordings: the captured calls (tensors or statistics), their storage format and checksums."""

from .model import Call, Mode, TensorStats
from .recording import Recording

__all__ = ["Call", "Mode", "Recording", "TensorStats"]
