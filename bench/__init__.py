"""Benchmarks: fused kernels (fwd+bwd) and the end-to-end training step. One CLI: `python -m bench.run`."""

import importlib.util as _util
import os as _os
import sys as _sys

# `python -m bench.run` puts the repository root on sys.path, where our top-level `kernels/` folder (installed as
# liger_fx.kernels) would answer to the name `kernels`. transformers probes for HF's hub-kernels package by that
# name and, finding no metadata, imports it (transformers 5.24 does), which registers every liger_fx op a second
# time; `torch.library.define` then raises and no model can be built. Hide only that shadow: a real `kernels`
# package elsewhere is left alone.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if "kernels" not in _sys.modules:
    _spec = _util.find_spec("kernels")
    if _spec is not None and _spec.origin and _os.path.dirname(_os.path.dirname(_spec.origin)) == _root:
        _sys.modules["kernels"] = None
