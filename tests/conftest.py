import os

import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter. It is chosen when a kernel is decorated, so it
# must be on before any kernels module is imported; conftest runs before the test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
