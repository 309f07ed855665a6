"""Fused ops, one file each: Triton kernels, launchers, a `<op>_ref` reference, and the `liger_fx::<op>` library op
with fake and autograd. Importing this package registers every op."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
