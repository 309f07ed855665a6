"""liger-fx: a torch.compile backend that fuses RMSNorm, RoPE, SwiGLU/GeGLU and lm_head+cross-entropy.

    torch.compile(model, backend="liger")          # no import needed: an entry point registers the backend
"""

from . import kernels  # noqa: F401  (registers the liger_fx:: ops)
from .backend import liger_backend
from .config import LigerConfig
from .rewrite import clear_records, get_records

__all__ = ["LigerConfig", "liger_backend", "get_records", "clear_records"]
