"""Fused ops, one file each: Triton kernels, launchers, a `<op>_ref` reference, and the `liger_fx::<op>` library op
with fake and autograd. Importing this package as `liger_fx.kernels` registers every op."""

import importlib
import pkgutil

# This folder installs as liger_fx.kernels. With the repository root on sys.path (pytest, PYTHONPATH=.) it is also
# visible as the top-level `kernels`, the import name of HF's hub-kernels package, and transformers imports that
# name to read a version. Under that name register nothing: a second registration of a liger_fx:: op raises.
__version__ = "N/A"  # not the hub-kernels package: transformers then reports it unavailable

if __name__ == "liger_fx.kernels":
    for _m in pkgutil.iter_modules(__path__):
        if not _m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{_m.name}")
