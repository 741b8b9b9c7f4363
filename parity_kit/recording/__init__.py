"""Recordings: the captured calls (tensors or statistics), their storage format and checksums."""

from .model import Call, Recording, TensorStats

__all__ = ["Call", "Recording", "TensorStats"]
