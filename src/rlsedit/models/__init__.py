"""Model loading and per-architecture facts."""

from rlsedit.models.arch import ARCHITECTURES, ArchSpec, UnsupportedArchitectureError, get_arch
from rlsedit.models.load import load_model

__all__ = ["ARCHITECTURES", "ArchSpec", "UnsupportedArchitectureError", "get_arch", "load_model"]
