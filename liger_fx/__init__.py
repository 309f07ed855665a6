"""liger-fx: a torch.compile backend that fuses RMSNorm, RoPE, SwiGLU/GeGLU and lm_head+cross-entropy.

    torch.compile(model, backend="liger")          # no import needed: an entry point registers the backend
"""

from . import kernels  # noqa: F401  (registers the liger_fx:: ops)
from .api import apply  # liger_fx.apply(model, **flags): compile in place, no logits in training steps
from .backend import liger_backend
from .config import LigerConfig
from .rewrite import clear_records, get_records

# The function shadows its module's name on the package: import the module's other names with
# `from liger_fx.report import ...`, which goes through sys.modules and still works.
from .report import report

__all__ = ["LigerConfig", "apply", "liger_backend", "get_records", "clear_records", "report"]
