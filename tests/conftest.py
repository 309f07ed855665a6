import os

import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter. It is chosen when a kernel is decorated, so it
# must be on before any kernels module is imported; conftest runs before the test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled code, zeroed counters and an empty rewrite record."""
    import liger_fx

    torch._dynamo.reset()
    counters.clear()
    liger_fx.clear_records()
    yield
    torch._dynamo.reset()
