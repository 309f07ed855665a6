"""Fused ops, one file each: Triton kernels, launchers, a `<op>_ref` reference, and the `liger_fx::<op>` library op
with fake and autograd. Importing this package registers every op.

This folder lives inside `liger_fx/`, not at the repository root: a root folder named `kernels` is importable as
the top-level `kernels` whenever the root is on sys.path (`python -m pytest`, `python -m bench.run`), as a package
with an `__init__.py` or, without one, as a namespace package. Either way it stands where Hugging Face's hub-kernels
package (`import kernels`, a dependency of transformers 5.25) is looked for: transformers then failed to import.
tests/test_packaging.py checks that no name we ship but `liger_fx` resolves into the checkout."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
